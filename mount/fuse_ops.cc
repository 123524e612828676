#define FUSE_USE_VERSION 314
#include "fuse_ops.h"

#include <fuse3/fuse_lowlevel.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <mutex>
#include <new>

#include "exit_codes.h"
#include "mountinfo.h"

namespace nemofs::mountcmd {
namespace {

// Everything in a read-only mount is immutable: cache names and attributes
// for a day, keep file pages in the kernel page cache across opens.
constexpr double kImmutableTimeout = 86400.0;
constexpr uint32_t kBlockSize = 1 << 20;
// Reads up to this size are copied instead of spliced (see OpRead).
constexpr uint64_t kCopyReplyMax = 32 << 10;  // st_blksize: cp/cat use it as their buffer size

struct Context {
  Filesystem* fs = nullptr;
  uid_t uid = 0;
  gid_t gid = 0;
  std::string bdi;  // "major:minor" of the mount, for the readahead setting
  std::once_flag readahead_once;
};

// The kernel's FUSE readahead window is 128 KiB and INIT can only lower it,
// so it is raised through sysfs once INIT has been processed: at the first
// request after it. 512 KiB, not 1 MiB: a reply of 1 MiB plus its header
// does not fit the largest pipe an unprivileged process may make
// (fs.pipe-max-size), and libfuse would fall back from splice to copying.
// Root only; best effort.
constexpr int kReadaheadKiB = 512;

void RaiseReadahead(Context& ctx) {
  std::call_once(ctx.readahead_once, [&] {
    if (ctx.bdi.empty()) return;
    std::ofstream f("/sys/class/bdi/" + ctx.bdi + "/read_ahead_kb");
    if (f) f << kReadaheadKiB << std::endl;
    if (!f) spdlog::debug("could not raise read_ahead_kb of bdi {}", ctx.bdi);
  });
}

Context* Ctx(fuse_req_t req) { return static_cast<Context*>(fuse_req_userdata(req)); }

void FillStat(const Context& ctx, const NodeAttr& a, struct stat* st) {
  std::memset(st, 0, sizeof *st);
  st->st_ino = a.ino;
  switch (a.type) {
    case NodeType::kDirectory:
      st->st_mode = S_IFDIR;
      break;
    case NodeType::kFile:
      st->st_mode = S_IFREG;
      break;
    case NodeType::kSymlink:
      st->st_mode = S_IFLNK;
      break;
  }
  st->st_mode |= a.perm;
  st->st_nlink = a.nlink;
  st->st_uid = ctx.uid;
  st->st_gid = ctx.gid;
  st->st_size = static_cast<off_t>(a.size);
  st->st_blksize = kBlockSize;
  st->st_blocks = static_cast<blkcnt_t>((a.size + 511) / 512);
  st->st_mtim.tv_sec = a.mtime_sec;
  st->st_mtim.tv_nsec = a.mtime_nsec;
  st->st_atim = st->st_mtim;
  st->st_ctim = st->st_mtim;
}

// Logs a failed op once, here at the boundary, then replies with its errno.
void ReplyError(fuse_req_t req, const char* op, uint64_t ino, const Error& error) {
  int code = error.code() > 0 ? error.code() : EIO;
  if (code == ENOENT || code == ENODATA) {
    spdlog::debug("{} ino={}: {} ({})", op, ino, error.message(), std::strerror(code));
  } else if (code == EIO || code == ENOMEM) {
    spdlog::error("{} ino={}: {} ({})", op, ino, error.message(), std::strerror(code));
  } else {
    spdlog::warn("{} ino={}: {} ({})", op, ino, error.message(), std::strerror(code));
  }
  fuse_reply_err(req, code);
}

// Runs an op body; anything thrown becomes one error reply (the body must
// not have replied yet when it throws).
template <typename Body>
void Guard(fuse_req_t req, const char* op, uint64_t ino, Body&& body) {
  try {
    body();
  } catch (const std::bad_alloc&) {
    ReplyError(req, op, ino, Error(ENOMEM, "out of memory"));
  } catch (const std::exception& e) {
    ReplyError(req, op, ino, Error(EIO, fmt::format("internal error: {}", e.what())));
  }
}

void OpInit(void* userdata, struct fuse_conn_info* conn) {
  (void)userdata;
  // Reads are answered from file descriptors: let libfuse splice them.
  if (conn->capable & FUSE_CAP_SPLICE_WRITE) conn->want |= FUSE_CAP_SPLICE_WRITE;
  if (conn->capable & FUSE_CAP_SPLICE_MOVE) conn->want |= FUSE_CAP_SPLICE_MOVE;
  if (conn->capable & FUSE_CAP_PARALLEL_DIROPS) conn->want |= FUSE_CAP_PARALLEL_DIROPS;
  // Content never changes under a mount: no invalidation on attr changes.
  conn->want &= ~FUSE_CAP_AUTO_INVAL_DATA;
  spdlog::debug("init: protocol {}.{}, max_readahead {}, max_write {}", conn->proto_major,
                conn->proto_minor, conn->max_readahead, conn->max_write);
}

// Valid replies: fuse_reply_entry, fuse_reply_err.
void OpLookup(fuse_req_t req, fuse_ino_t parent, const char* name) {
  RaiseReadahead(*Ctx(req));
  Guard(req, "lookup", parent, [&] {
    auto attr = Ctx(req)->fs->Lookup(parent, name);
    if (!attr) return ReplyError(req, "lookup", parent, attr.error());
    fuse_entry_param e{};
    e.ino = attr->ino;
    e.attr_timeout = kImmutableTimeout;
    e.entry_timeout = kImmutableTimeout;
    FillStat(*Ctx(req), *attr, &e.attr);
    fuse_reply_entry(req, &e);
  });
}

// Inodes are static node-table indices: nothing to forget. Reply: none.
void OpForget(fuse_req_t req, fuse_ino_t, uint64_t) { fuse_reply_none(req); }
void OpForgetMulti(fuse_req_t req, size_t, struct fuse_forget_data*) { fuse_reply_none(req); }

// Valid replies: fuse_reply_attr, fuse_reply_err.
void OpGetAttr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info*) {
  RaiseReadahead(*Ctx(req));
  Guard(req, "getattr", ino, [&] {
    auto attr = Ctx(req)->fs->GetAttr(ino);
    if (!attr) return ReplyError(req, "getattr", ino, attr.error());
    struct stat st;
    FillStat(*Ctx(req), *attr, &st);
    fuse_reply_attr(req, &st, kImmutableTimeout);
  });
}

// Valid replies: fuse_reply_attr, fuse_reply_err. Everything is read-only.
void OpSetAttr(fuse_req_t req, fuse_ino_t ino, struct stat*, int, struct fuse_file_info*) {
  ReplyError(req, "setattr", ino, Error(EROFS, "the tree is read-only"));
}

// Valid replies: fuse_reply_readlink, fuse_reply_err.
void OpReadLink(fuse_req_t req, fuse_ino_t ino) {
  Guard(req, "readlink", ino, [&] {
    auto target = Ctx(req)->fs->ReadLink(ino);
    if (!target) return ReplyError(req, "readlink", ino, target.error());
    fuse_reply_readlink(req, target->c_str());
  });
}

// Valid replies: fuse_reply_open, fuse_reply_err.
void OpOpen(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info* fi) {
  RaiseReadahead(*Ctx(req));
  Guard(req, "open", ino, [&] {
    auto ok = Ctx(req)->fs->CheckOpen(ino, fi->flags);
    if (!ok) return ReplyError(req, "open", ino, ok.error());
    fi->keep_cache = 1;
    fuse_reply_open(req, fi);
  });
}

// Valid replies: fuse_reply_data, fuse_reply_buf, fuse_reply_err.
void OpRead(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info*) {
  Guard(req, "read", ino, [&] {
    auto plan = Ctx(req)->fs->Read(ino, static_cast<uint64_t>(off), size);
    if (!plan) return ReplyError(req, "read", ino, plan.error());
    const auto& pieces = plan->pieces;
    if (pieces.empty()) {
      fuse_reply_buf(req, nullptr, 0);
      return;
    }
    // Small reads (random access, headers): one pread into a per-thread
    // buffer and one writev cost fewer syscalls than splicing through a pipe.
    if (plan->size() <= kCopyReplyMax) {
      thread_local std::string small(kCopyReplyMax, '\0');
      auto ok = ExecuteReadPlan(*plan, small.data());
      if (!ok) return ReplyError(req, "read", ino, ok.error());
      fuse_reply_buf(req, small.data(), plan->size());
      return;
    }
    size_t bytes = sizeof(fuse_bufvec) + (pieces.size() - 1) * sizeof(fuse_buf);
    std::unique_ptr<fuse_bufvec, decltype(&std::free)> vec(
        static_cast<fuse_bufvec*>(std::calloc(1, bytes)), &std::free);
    if (!vec) throw std::bad_alloc();
    vec->count = pieces.size();
    for (size_t i = 0; i < pieces.size(); ++i) {
      fuse_buf& b = vec->buf[i];
      b.size = pieces[i].length;
      if (pieces[i].fd >= 0) {
        b.flags =
            static_cast<fuse_buf_flags>(FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK | FUSE_BUF_FD_RETRY);
        b.fd = pieces[i].fd;
        b.pos = static_cast<off_t>(pieces[i].offset);
      } else {
        b.mem = const_cast<char*>(pieces[i].data);
      }
    }
    int rc = fuse_reply_data(req, vec.get(), FUSE_BUF_SPLICE_MOVE);
    if (rc != 0) spdlog::error("read ino={}: reply failed: {}", ino, std::strerror(-rc));
  });
}

// Valid replies: fuse_reply_err (success is 0).
void OpRelease(fuse_req_t req, fuse_ino_t, struct fuse_file_info*) { fuse_reply_err(req, 0); }

// Valid replies: fuse_reply_open, fuse_reply_err.
void OpOpenDir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info* fi) {
  RaiseReadahead(*Ctx(req));
  Guard(req, "opendir", ino, [&] {
    auto attr = Ctx(req)->fs->GetAttr(ino);
    if (!attr) return ReplyError(req, "opendir", ino, attr.error());
    if (attr->type != NodeType::kDirectory) {
      return ReplyError(req, "opendir", ino, Error(ENOTDIR, "not a directory"));
    }
    fi->cache_readdir = 1;
    fi->keep_cache = 1;
    fuse_reply_open(req, fi);
  });
}

// Offsets: 1 after ".", 2 after "..", k + 2 after the k-th child.
// Valid replies: fuse_reply_buf, fuse_reply_err.
void DoReadDir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, bool plus) {
  const char* op = plus ? "readdirplus" : "readdir";
  Guard(req, op, ino, [&] {
    Context& ctx = *Ctx(req);
    auto self = ctx.fs->GetAttr(ino);
    if (!self) return ReplyError(req, op, ino, self.error());
    std::string buf(size, '\0');
    size_t used = 0;
    auto add = [&](const char* name, const NodeAttr& attr, off_t next) -> bool {
      size_t need;
      if (plus) {
        fuse_entry_param e{};
        e.ino = attr.ino;
        e.attr_timeout = kImmutableTimeout;
        e.entry_timeout = kImmutableTimeout;
        FillStat(ctx, attr, &e.attr);
        need = fuse_add_direntry_plus(req, buf.data() + used, size - used, name, &e, next);
      } else {
        struct stat st;
        FillStat(ctx, attr, &st);
        need = fuse_add_direntry(req, buf.data() + used, size - used, name, &st, next);
      }
      if (need > size - used) return false;
      used += need;
      return true;
    };
    if (off < 1 && !add(".", *self, 1)) off = -1;
    if (off >= 0 && off < 2) {
      auto parent = ctx.fs->Lookup(ino, "..");
      if (!parent) return ReplyError(req, op, ino, parent.error());
      if (!add("..", *parent, 2)) off = -1;
    }
    if (off >= 0) {
      uint64_t first = off > 2 ? static_cast<uint64_t>(off) - 2 : 0;
      auto st = ctx.fs->ReadDir(ino, first, [&](const DirEntry& e, uint64_t next) {
        auto attr = ctx.fs->GetAttr(e.ino);
        if (!attr) return false;
        std::string name(e.name);
        return add(name.c_str(), *attr, static_cast<off_t>(next + 2));
      });
      if (!st) return ReplyError(req, op, ino, st.error());
    }
    fuse_reply_buf(req, buf.data(), used);
  });
}
void OpReadDir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info*) {
  DoReadDir(req, ino, size, off, false);
}
void OpReadDirPlus(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info*) {
  DoReadDir(req, ino, size, off, true);
}
void OpReleaseDir(fuse_req_t req, fuse_ino_t, struct fuse_file_info*) { fuse_reply_err(req, 0); }

// Valid replies: fuse_reply_statfs, fuse_reply_err.
void OpStatFs(fuse_req_t req, fuse_ino_t) {
  const CheckpointInfo& info = Ctx(req)->fs->info();
  struct statvfs s {};
  s.f_bsize = 4096;
  s.f_frsize = 4096;
  s.f_blocks = (info.source_bytes + 4095) / 4096;
  s.f_files = Ctx(req)->fs->node_count();
  s.f_namemax = 255;
  fuse_reply_statfs(req, &s);
}

// Replies with the value, or its size when size == 0. Valid replies:
// fuse_reply_buf, fuse_reply_xattr, fuse_reply_err.
void ReplyXattr(fuse_req_t req, const std::string& value, size_t size) {
  if (size == 0) {
    fuse_reply_xattr(req, value.size());
  } else if (size < value.size()) {
    fuse_reply_err(req, ERANGE);
  } else {
    fuse_reply_buf(req, value.data(), value.size());
  }
}

// The root also carries user.nemofs.pid (this daemon), which `nemofs umount` reads.
void OpGetXattr(fuse_req_t req, fuse_ino_t ino, const char* name, size_t size) {
  Guard(req, "getxattr", ino, [&] {
    if (ino == Filesystem::kRootIno && std::strcmp(name, "user.nemofs.pid") == 0) {
      return ReplyXattr(req, std::to_string(::getpid()), size);
    }
    auto value = Ctx(req)->fs->GetXattr(ino, name);
    if (!value) return ReplyError(req, "getxattr", ino, value.error());
    ReplyXattr(req, *value, size);
  });
}

void OpListXattr(fuse_req_t req, fuse_ino_t ino, size_t size) {
  Guard(req, "listxattr", ino, [&] {
    auto names = Ctx(req)->fs->ListXattr(ino);
    if (!names) return ReplyError(req, "listxattr", ino, names.error());
    std::string joined;
    if (ino == Filesystem::kRootIno) names->push_back("user.nemofs.pid");
    for (const auto& n : *names) joined.append(n).push_back('\0');
    ReplyXattr(req, joined, size);
  });
}

const fuse_lowlevel_ops kOps = [] {
  fuse_lowlevel_ops ops{};
  ops.init = OpInit;
  ops.lookup = OpLookup;
  ops.forget = OpForget;
  ops.forget_multi = OpForgetMulti;
  ops.getattr = OpGetAttr;
  ops.setattr = OpSetAttr;
  ops.readlink = OpReadLink;
  ops.open = OpOpen;
  ops.read = OpRead;
  ops.release = OpRelease;
  ops.opendir = OpOpenDir;
  ops.readdir = OpReadDir;
  ops.readdirplus = OpReadDirPlus;
  ops.releasedir = OpReleaseDir;
  ops.statfs = OpStatFs;
  ops.getxattr = OpGetXattr;
  ops.listxattr = OpListXattr;
  return ops;
}();

struct SessionDeleter {
  void operator()(fuse_session* se) const { fuse_session_destroy(se); }
};
struct LoopConfigDeleter {
  void operator()(fuse_loop_config* c) const { fuse_loop_cfg_destroy(c); }
};

}  // namespace

int MountAndServe(Filesystem& fs, const FuseMountConfig& config) {
  Context ctx;
  ctx.fs = &fs;
  ctx.uid = ::getuid();
  ctx.gid = ::getgid();

  std::vector<std::string> argv_storage = {"nemofs"};
  std::string opts =
      fmt::format("fsname=nemofs:{},subtype=nemofs,default_permissions", config.source);
  if (config.read_only) opts += ",ro";
  for (const auto& o : config.fuse_options) opts += "," + o;
  argv_storage.push_back("-o");
  argv_storage.push_back(opts);
  std::vector<char*> argv;
  for (auto& s : argv_storage) argv.push_back(s.data());
  fuse_args args = FUSE_ARGS_INIT(static_cast<int>(argv.size()), argv.data());

  std::unique_ptr<fuse_session, SessionDeleter> se(
      fuse_session_new(&args, &kOps, sizeof kOps, &ctx));
  fuse_opt_free_args(&args);  // libfuse may have copied them; the session keeps what it needs
  if (!se) {
    spdlog::error("{}: cannot create a FUSE session (bad -o option?)", config.mountpoint);
    return kExitUsage;
  }
  if (fuse_set_signal_handlers(se.get()) != 0) {
    spdlog::error("cannot install signal handlers");
    return kExitMount;
  }
  if (fuse_session_mount(se.get(), config.mountpoint.c_str()) != 0) {
    fuse_remove_signal_handlers(se.get());
    spdlog::error("{}: mount failed (is /dev/fuse available and fusermount3 installed?)",
                  config.mountpoint);
    return kExitMount;
  }
  ctx.bdi = MountDevice(config.mountpoint).value_or("");
  spdlog::info("mounted {} on {} ({} nodes)", config.source, config.mountpoint, fs.node_count());
  // Parent returns (exit 0) only now: the mount is ready.
  fuse_daemonize(config.foreground ? 1 : 0);

  std::unique_ptr<fuse_loop_config, LoopConfigDeleter> loop(fuse_loop_cfg_create());
  fuse_loop_cfg_set_clone_fd(loop.get(), 1);
  fuse_loop_cfg_set_idle_threads(loop.get(), 4);
  fuse_loop_cfg_set_max_threads(loop.get(), 16);
  int rc = fuse_session_loop_mt(se.get(), loop.get());
  fuse_session_unmount(se.get());
  fuse_remove_signal_handlers(se.get());
  // The loop returns 0 after fusermount3 -u, the signal number after
  // SIGTERM/SIGINT/SIGHUP (both clean ends), -errno on failure.
  if (rc < 0) {
    spdlog::error("unmounted {} after a FUSE error: {}", config.mountpoint, std::strerror(-rc));
    return kExitMount;
  }
  spdlog::info("unmounted {}{}", config.mountpoint,
               rc > 0 ? fmt::format(" on signal {}", rc) : std::string());
  return kExitOk;
}

}  // namespace nemofs::mountcmd
