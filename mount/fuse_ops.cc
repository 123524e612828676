#define FUSE_USE_VERSION 314
#include "fuse_ops.h"

#include <fuse3/fuse_lowlevel.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
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

// Everything but the config and scratch files is immutable: cache names and
// attributes for a day, keep file pages in the kernel page cache across
// opens. What can change (Filesystem::Volatile) is never cached.
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

double Timeout(const Context& ctx, uint64_t ino) {
  return ctx.fs->Volatile(ino) ? 0.0 : kImmutableTimeout;
}

void FillEntry(const Context& ctx, const NodeAttr& attr, fuse_entry_param* e) {
  *e = fuse_entry_param{};
  e->ino = attr.ino;
  e->attr_timeout = Timeout(ctx, attr.ino);
  e->entry_timeout = e->attr_timeout;
  FillStat(ctx, attr, &e->attr);
}

// Logs a failed op once, here at the boundary, then replies with its errno.
// Misses tools probe for (ENOENT, ENODATA, ENOTSUP of xattrs) are debug-level.
void ReplyError(fuse_req_t req, const char* op, uint64_t ino, const Error& error) {
  int code = error.code() > 0 ? error.code() : EIO;
  if (code == ENOENT || code == ENODATA || code == ENOTSUP) {
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
  // Content never changes under a mount (the config is read with direct
  // I/O): no invalidation on attribute changes.
  conn->want &= ~FUSE_CAP_AUTO_INVAL_DATA;
  // open(O_TRUNC) arrives as one open, not as a truncate then an open: an
  // empty config in between would be refused as invalid YAML.
  if (conn->capable & FUSE_CAP_ATOMIC_O_TRUNC) conn->want |= FUSE_CAP_ATOMIC_O_TRUNC;
  conn->want &= ~FUSE_CAP_WRITEBACK_CACHE;
  spdlog::debug("init: protocol {}.{}, max_readahead {}, max_write {}", conn->proto_major,
                conn->proto_minor, conn->max_readahead, conn->max_write);
}

// Valid replies: fuse_reply_entry, fuse_reply_err.
void OpLookup(fuse_req_t req, fuse_ino_t parent, const char* name) {
  RaiseReadahead(*Ctx(req));
  Guard(req, "lookup", parent, [&] {
    auto attr = Ctx(req)->fs->Lookup(parent, name);
    if (!attr) return ReplyError(req, "lookup", parent, attr.error());
    fuse_entry_param e;
    FillEntry(*Ctx(req), *attr, &e);
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
    fuse_reply_attr(req, &st, Timeout(*Ctx(req), ino));
  });
}

// Valid replies: fuse_reply_attr, fuse_reply_err. Owner changes are
// accepted only as no-ops (every file belongs to the mounting user);
// atime/ctime are not kept.
void OpSetAttr(fuse_req_t req, fuse_ino_t ino, struct stat* attr, int to_set,
               struct fuse_file_info* fi) {
  Guard(req, "setattr", ino, [&] {
    Context& ctx = *Ctx(req);
    if (((to_set & FUSE_SET_ATTR_UID) && attr->st_uid != ctx.uid) ||
        ((to_set & FUSE_SET_ATTR_GID) && attr->st_gid != ctx.gid)) {
      return ReplyError(req, "setattr", ino,
                        Error(EPERM, "files of the mount belong to the mounting user"));
    }
    AttrChange change;
    change.set_size = to_set & FUSE_SET_ATTR_SIZE;
    change.size = static_cast<uint64_t>(attr->st_size);
    change.set_mode = to_set & FUSE_SET_ATTR_MODE;
    change.mode = attr->st_mode & 07777;
    if (to_set & FUSE_SET_ATTR_MTIME_NOW) {
      struct timespec now {};
      ::clock_gettime(CLOCK_REALTIME, &now);
      change.set_mtime = true;
      change.mtime_sec = now.tv_sec;
      change.mtime_nsec = static_cast<uint32_t>(now.tv_nsec);
    } else if (to_set & FUSE_SET_ATTR_MTIME) {
      change.set_mtime = true;
      change.mtime_sec = attr->st_mtim.tv_sec;
      change.mtime_nsec = static_cast<uint32_t>(attr->st_mtim.tv_nsec);
    }
    auto result = ctx.fs->SetAttr(ino, fi ? fi->fh : 0, change);
    if (!result) return ReplyError(req, "setattr", ino, result.error());
    struct stat st;
    FillStat(ctx, *result, &st);
    fuse_reply_attr(req, &st, Timeout(ctx, ino));
  });
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
    auto opened = Ctx(req)->fs->OpenFile(ino, fi->flags);
    if (!opened) return ReplyError(req, "open", ino, opened.error());
    fi->fh = opened->fh;
    fi->direct_io = opened->direct_io;
    fi->keep_cache = !opened->direct_io;
    if (fuse_reply_open(req, fi) != 0) Ctx(req)->fs->Release(ino, fi->fh);  // interrupted
  });
}

// Valid replies: fuse_reply_data, fuse_reply_buf, fuse_reply_err.
void OpRead(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info* fi) {
  Guard(req, "read", ino, [&] {
    auto plan = Ctx(req)->fs->Read(ino, static_cast<uint64_t>(off), size, fi->fh);
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

// Valid replies: fuse_reply_write, fuse_reply_err.
void OpWrite(fuse_req_t req, fuse_ino_t ino, const char* buf, size_t size, off_t off,
             struct fuse_file_info* fi) {
  Guard(req, "write", ino, [&] {
    auto n = Ctx(req)->fs->Write(ino, fi->fh, static_cast<uint64_t>(off),
                                 std::string_view(buf, size));
    if (!n) return ReplyError(req, "write", ino, n.error());
    fuse_reply_write(req, *n);
  });
}

// close(2) of a descriptor: commits the config edit it made (the error,
// EINVAL for invalid YAML, is what close returns). Valid reply: fuse_reply_err.
void OpFlush(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info* fi) {
  Guard(req, "flush", ino, [&] {
    auto st = Ctx(req)->fs->Flush(ino, fi->fh);
    if (!st) return ReplyError(req, "flush", ino, st.error());
    fuse_reply_err(req, 0);
  });
}

void OpFsync(fuse_req_t req, fuse_ino_t ino, int, struct fuse_file_info* fi) {
  Guard(req, "fsync", ino, [&] {
    auto st = Ctx(req)->fs->Flush(ino, fi->fh);
    if (!st) return ReplyError(req, "fsync", ino, st.error());
    fuse_reply_err(req, 0);
  });
}

// Valid replies: fuse_reply_err (success is 0).
void OpRelease(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info* fi) {
  Guard(req, "release", ino, [&] {
    Ctx(req)->fs->Release(ino, fi->fh);
    fuse_reply_err(req, 0);
  });
}

// Valid replies: fuse_reply_create, fuse_reply_err.
void OpCreate(fuse_req_t req, fuse_ino_t parent, const char* name, mode_t mode,
              struct fuse_file_info* fi) {
  Guard(req, "create", parent, [&] {
    Context& ctx = *Ctx(req);
    auto created = ctx.fs->Create(parent, name, mode, fi->flags);
    if (!created) return ReplyError(req, "create", parent, created.error());
    fuse_entry_param e;
    FillEntry(ctx, created->first, &e);
    fi->fh = created->second.fh;
    fi->direct_io = created->second.direct_io;
    if (fuse_reply_create(req, &e, fi) != 0) ctx.fs->Release(e.ino, fi->fh);
  });
}

void OpUnlink(fuse_req_t req, fuse_ino_t parent, const char* name) {
  Guard(req, "unlink", parent, [&] {
    auto st = Ctx(req)->fs->Unlink(parent, name);
    if (!st) return ReplyError(req, "unlink", parent, st.error());
    fuse_reply_err(req, 0);
  });
}

void OpRename(fuse_req_t req, fuse_ino_t parent, const char* name, fuse_ino_t new_parent,
              const char* new_name, unsigned int flags) {
  Guard(req, "rename", parent, [&] {
    auto st = Ctx(req)->fs->Rename(parent, name, new_parent, new_name, flags);
    if (!st) return ReplyError(req, "rename", parent, st.error());
    fuse_reply_err(req, 0);
  });
}

// Directories, links and device nodes are never created. Reply: fuse_reply_err.
void RefuseCreate(fuse_req_t req, const char* op, fuse_ino_t parent) {
  int code = Ctx(req)->fs->writable() ? EPERM : EROFS;
  ReplyError(req, op, parent,
             Error(code, fmt::format("{}: only plain scratch files next to config.yaml can be "
                                     "created in the tree",
                                     op)));
}
void OpMknod(fuse_req_t req, fuse_ino_t parent, const char*, mode_t, dev_t) {
  RefuseCreate(req, "mknod", parent);
}
void OpMkdir(fuse_req_t req, fuse_ino_t parent, const char*, mode_t) {
  RefuseCreate(req, "mkdir", parent);
}
void OpSymlink(fuse_req_t req, const char*, fuse_ino_t parent, const char*) {
  RefuseCreate(req, "symlink", parent);
}
void OpLink(fuse_req_t req, fuse_ino_t, fuse_ino_t parent, const char*) {
  RefuseCreate(req, "link", parent);
}
void OpRmdir(fuse_req_t req, fuse_ino_t parent, const char*) {
  int code = Ctx(req)->fs->writable() ? EPERM : EROFS;
  ReplyError(req, "rmdir", parent, Error(code, "directories of the tree cannot be removed"));
}
// Extended attributes are the tree's own (user.nemofs.*): not settable.
void OpSetXattr(fuse_req_t req, fuse_ino_t ino, const char*, const char*, size_t, int) {
  ReplyError(req, "setxattr", ino, Error(ENOTSUP, "extended attributes cannot be set"));
}
void OpRemoveXattr(fuse_req_t req, fuse_ino_t ino, const char*) {
  ReplyError(req, "removexattr", ino, Error(ENOTSUP, "extended attributes cannot be removed"));
}

// Valid replies: fuse_reply_open, fuse_reply_err.
void OpOpenDir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info* fi) {
  RaiseReadahead(*Ctx(req));
  Guard(req, "opendir", ino, [&] {
    auto attr = Ctx(req)->fs->GetAttr(ino);
    if (!attr) return ReplyError(req, "opendir", ino, attr.error());
    if (attr->type != NodeType::kDirectory) {
      return ReplyError(req, "opendir", ino, Error(ENOTDIR, "not a directory"));
    }
    // Directories holding scratch files change: never cache their listing.
    fi->cache_readdir = !Ctx(req)->fs->Volatile(ino);
    fi->keep_cache = fi->cache_readdir;
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
        fuse_entry_param e;
        FillEntry(ctx, attr, &e);
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
  // Saves write into the source's file system: report its free space.
  struct statvfs under {};
  if (Ctx(req)->fs->writable() && ::statvfs(info.source.c_str(), &under) == 0) {
    s.f_bfree = under.f_bfree * under.f_frsize / s.f_frsize;
    s.f_bavail = under.f_bavail * under.f_frsize / s.f_frsize;
  }
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
  ops.write = OpWrite;
  ops.flush = OpFlush;
  ops.fsync = OpFsync;
  ops.release = OpRelease;
  ops.create = OpCreate;
  ops.unlink = OpUnlink;
  ops.rename = OpRename;
  ops.mknod = OpMknod;
  ops.mkdir = OpMkdir;
  ops.symlink = OpSymlink;
  ops.link = OpLink;
  ops.rmdir = OpRmdir;
  ops.setxattr = OpSetXattr;
  ops.removexattr = OpRemoveXattr;
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
