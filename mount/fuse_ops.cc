#define FUSE_USE_VERSION 314
#include "fuse_ops.h"

#include <fuse3/fuse_lowlevel.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <fcntl.h>
#include <sys/statfs.h>
#include <sys/statvfs.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <condition_variable>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <mutex>
#include <new>
#include <thread>

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
  uint32_t max_read = 0;  // -o max_read=N: libfuse wants init to confirm it
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

// Drops the kernel's cached pages and attributes of nodes a commit changed
// (Filesystem::SetInvalidator). fuse_lowlevel_notify_inval_inode must not
// run in the path of a request on the same inode (the kernel may wait for
// that request: a deadlock), so a thread of its own sends them.
class Invalidator {
 public:
  explicit Invalidator(fuse_session* se) : se_(se), thread_([this] { Run(); }) {}
  ~Invalidator() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_one();
    thread_.join();
  }
  void Add(const std::vector<uint64_t>& inos) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      queue_.insert(queue_.end(), inos.begin(), inos.end());
    }
    cv_.notify_one();
  }
  void AddEntries(const std::vector<std::pair<uint64_t, std::string>>& entries) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      entries_.insert(entries_.end(), entries.begin(), entries.end());
    }
    cv_.notify_one();
  }

 private:
  void Run() {
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      cv_.wait(lock, [&] { return stop_ || !queue_.empty() || !entries_.empty(); });
      if (queue_.empty() && entries_.empty()) return;  // stopping, nothing left
      std::vector<uint64_t> batch(queue_.begin(), queue_.end());
      std::vector<std::pair<uint64_t, std::string>> names = std::move(entries_);
      queue_.clear();
      entries_.clear();
      lock.unlock();
      for (uint64_t ino : batch) {
        int rc = fuse_lowlevel_notify_inval_inode(se_, ino, 0, 0);
        if (rc != 0 && rc != -ENOENT) {
          spdlog::debug("invalidating inode {}: {}", ino, std::strerror(-rc));
        }
      }
      for (const auto& [parent, name] : names) {
        int rc = fuse_lowlevel_notify_inval_entry(se_, parent, name.data(), name.size());
        if (rc != 0 && rc != -ENOENT) {
          spdlog::debug("invalidating '{}' in inode {}: {}", name, parent, std::strerror(-rc));
        }
      }
      lock.lock();
    }
  }
  fuse_session* se_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<uint64_t> queue_;
  std::vector<std::pair<uint64_t, std::string>> entries_;
  bool stop_ = false;
  std::thread thread_;
};

Context* Ctx(fuse_req_t req) { return static_cast<Context*>(fuse_req_userdata(req)); }

void FillStat(const Context&, const NodeAttr& a, struct stat* st) {
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
  st->st_uid = a.uid;
  st->st_gid = a.gid;
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
  auto* ctx = static_cast<Context*>(userdata);
  // Crash test hook (as write/fault.h): the daemon dies in the middle of INIT.
  if (const char* f = std::getenv("NEMOFS_FAULT"); f && std::strcmp(f, "fuse-init") == 0) {
    ::_exit(77);
  }
  // libfuse refuses the INIT (and the mount dies) unless init repeats -o max_read.
  if (ctx->max_read) conn->max_read = ctx->max_read;
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
// accepted only as no-ops (owners come from the source);
// atime/ctime are not kept.
void OpSetAttr(fuse_req_t req, fuse_ino_t ino, struct stat* attr, int to_set,
               struct fuse_file_info* fi) {
  Guard(req, "setattr", ino, [&] {
    Context& ctx = *Ctx(req);
    if (to_set & (FUSE_SET_ATTR_UID | FUSE_SET_ATTR_GID)) {
      auto now = ctx.fs->GetAttr(ino);
      if (!now) return ReplyError(req, "setattr", ino, now.error());
      if (((to_set & FUSE_SET_ATTR_UID) && attr->st_uid != now->uid) ||
          ((to_set & FUSE_SET_ATTR_GID) && attr->st_gid != now->gid)) {
        return ReplyError(req, "setattr", ino,
                          Error(EPERM, "owners of the tree come from the source"));
      }
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
                                 std::string_view(buf, size), fuse_req_ctx(req)->pid);
    if (!n) return ReplyError(req, "write", ino, n.error());
    fuse_reply_write(req, *n);
  });
}

// close(2) of a descriptor: commits the config edit it made (the error,
// EINVAL for invalid YAML, is what close returns). Valid reply: fuse_reply_err.
void OpFlush(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info* fi) {
  Guard(req, "flush", ino, [&] {
    auto st = Ctx(req)->fs->Flush(ino, fi->fh, fuse_req_ctx(req)->pid);
    if (!st) return ReplyError(req, "flush", ino, st.error());
    fuse_reply_err(req, 0);
  });
}

void OpFsync(fuse_req_t req, fuse_ino_t ino, int, struct fuse_file_info* fi) {
  Guard(req, "fsync", ino, [&] {
    auto st = Ctx(req)->fs->Fsync(ino, fi->fh);
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
  bool writable = Ctx(req)->fs->writable();
  int code = writable ? EPERM : EROFS;
  ReplyError(req, op, parent,
             Error(code, writable ? fmt::format("{}: directories, links and device nodes cannot "
                                                "be created in the tree (new regular files in the "
                                                "root and archive/ can, and are stored)",
                                                op)
                                  : fmt::format("{}: the tree is read-only", op)));
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
// Extended attributes are the tree's own (user.nemofs.*): settable only
// on a new tensor file (its dtype and shape). `user.nemofs.store` on the root: stores the new files now (what
// `nemofs umount` asks before unmounting, so that it can report a failure).
void OpSetXattr(fuse_req_t req, fuse_ino_t ino, const char* name, const char* value,
                size_t size, int) {
  if (ino == FUSE_ROOT_ID && std::string_view(name) == "user.nemofs.store") {
    return Guard(req, "setxattr", ino, [&] {
      auto st = Ctx(req)->fs->StoreNewFiles();
      if (!st) return ReplyError(req, "setxattr", ino, st.error());
      fuse_reply_err(req, 0);
    });
  }
  // user.nemofs.dtype / shape of a new tensor file (Filesystem::SetXattr).
  Guard(req, "setxattr", ino, [&] {
    auto st = Ctx(req)->fs->SetXattr(ino, name, std::string_view(value, size));
    if (!st) return ReplyError(req, "setxattr", ino, st.error());
    fuse_reply_err(req, 0);
  });
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

}  // namespace

StatFsNumbers ComputeStatFs(uint64_t used_bytes, bool writable, const std::string& source) {
  constexpr uint64_t kBs = 4096;
  StatFsNumbers n;
  // An archive uses its file's size (headers, padding, superseded copies);
  // a folder, the sum of its files.
  struct stat st {};
  if (::stat(source.c_str(), &st) == 0 && S_ISREG(st.st_mode)) used_bytes = st.st_size;
  uint64_t used = (used_bytes + kBs - 1) / kBs;
  struct statvfs under {};
  if (writable && ::statvfs(source.c_str(), &under) == 0) {
    n.free = static_cast<uint64_t>(under.f_bfree) * under.f_frsize / kBs;
    n.avail = std::min<uint64_t>(n.free, static_cast<uint64_t>(under.f_bavail) * under.f_frsize / kBs);
  }
  n.blocks = used + n.free;
  return n;
}

namespace {

// Valid replies: fuse_reply_statfs, fuse_reply_err.
void OpStatFs(fuse_req_t req, fuse_ino_t) {
  const CheckpointInfo& info = Ctx(req)->fs->info();
  struct statvfs s {};
  s.f_bsize = 4096;
  s.f_frsize = 4096;
  s.f_files = Ctx(req)->fs->node_count();
  s.f_namemax = 255;
  // Used: the checkpoint as stored. Free: what saves can use, the source's
  // file system's free space (none on a read-only mount). Size = used + free,
  // so df shows blocks >= free >= available and a non-negative use.
  StatFsNumbers n = ComputeStatFs(info.source_bytes, Ctx(req)->fs->writable(), info.source);
  s.f_blocks = n.blocks;
  s.f_bfree = n.free;
  s.f_bavail = n.avail;
  s.f_ffree = 0;
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

// The root also carries user.nemofs.pid (this daemon) and
// user.nemofs.unstored (the editors' temp files unmount leaves out, one
// line each), which `nemofs umount` reads.
void OpGetXattr(fuse_req_t req, fuse_ino_t ino, const char* name, size_t size) {
  Guard(req, "getxattr", ino, [&] {
    if (ino == Filesystem::kRootIno && std::strcmp(name, "user.nemofs.pid") == 0) {
      return ReplyXattr(req, std::to_string(::getpid()), size);
    }
    if (ino == Filesystem::kRootIno && std::strcmp(name, "user.nemofs.unstored") == 0) {
      // An xattr value holds at most 64 KiB: the rest is counted.
      auto all = Ctx(req)->fs->UnstoredTempFiles();
      std::string lines;
      size_t n = 0;
      for (; n < all.size() && lines.size() + all[n].size() < 60000; ++n) lines += all[n] + "\n";
      if (n < all.size()) {
        lines += fmt::format("not stored: {} more editors' temp files (see the daemon's log)\n",
                             all.size() - n);
      }
      return ReplyXattr(req, lines, size);
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

// libfuse's own messages ("fuse: unknown option...", "init() and
// fuse_session_new() requested different maximum read size") go to the log,
// and the last error is kept for the readiness report.
std::mutex g_fuse_error_mu;
std::string g_fuse_error;

void FuseLog(enum fuse_log_level level, const char* fmt_str, va_list ap) {
  char buf[1024];
  std::vsnprintf(buf, sizeof buf, fmt_str, ap);
  std::string msg(buf);
  while (!msg.empty() && msg.back() == '\n') msg.pop_back();
  if (level <= FUSE_LOG_ERR) {
    spdlog::error("{}", msg);
    std::lock_guard<std::mutex> lock(g_fuse_error_mu);
    g_fuse_error = msg;
  } else if (level <= FUSE_LOG_NOTICE) {
    spdlog::info("{}", msg);
  } else {
    spdlog::debug("{}", msg);
  }
}

std::string LastFuseError() {
  std::lock_guard<std::mutex> lock(g_fuse_error_mu);
  return g_fuse_error;
}

// The daemon's half of the readiness pipe (DESIGN.md §3): one line, "ok" or
// "error: <message>", written once, then the pipe is closed and the parent
// (`nemofs mount`) exits 0 or prints the message and exits non-zero.
class Readiness {
 public:
  explicit Readiness(int fd) : fd_(fd) {}
  ~Readiness() { Report("error: the daemon exited before the mount was ready"); }
  // First report wins; later ones are ignored.
  void Report(const std::string& line) {
    std::lock_guard<std::mutex> lock(mu_);
    if (fd_ < 0) return;
    std::string out = line + "\n";
    ssize_t n = ::write(fd_, out.data(), out.size());
    (void)n;  // the parent is gone if this fails: nobody left to tell
    ::close(fd_);
    fd_ = -1;
  }

 private:
  std::mutex mu_;
  int fd_;
};

constexpr long kFuseSuperMagic = 0x65735546;

// Runs in the daemon beside the request loop: statfs(2) of the mount point
// blocks in the kernel until FUSE INIT has completed and then succeeds (our
// own OpStatFs answers it), or fails if the kernel or libfuse refused INIT.
void WaitUntilReady(std::shared_ptr<Readiness> ready, std::string mountpoint) {
  struct statfs sfs {};
  if (::statfs(mountpoint.c_str(), &sfs) == 0 && sfs.f_type == kFuseSuperMagic) {
    ready->Report("ok");
    return;
  }
  int e = errno;
  std::string why = LastFuseError();
  if (why.empty()) why = std::strerror(e);
  ready->Report(fmt::format("error: {}: FUSE initialisation failed: {}", mountpoint, why));
}

// Parent side: waits for the daemon's line; returns the exit code of `mount`.
// A daemon that died leaves a dead mount behind: it is detached here.
int AwaitDaemon(int fd, pid_t child, const std::string& mountpoint) {
  std::string line;
  char buf[512];
  for (;;) {
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    line.append(buf, static_cast<size_t>(n));
  }
  ::close(fd);
  while (!line.empty() && line.back() == '\n') line.pop_back();
  if (line == "ok") return kExitOk;
  if (line.rfind("error: ", 0) == 0) line = line.substr(7);
  if (line.empty()) {
    int status = 0;
    ::waitpid(child, &status, 0);
    line = fmt::format("{}: the daemon died before the mount was ready ({})", mountpoint,
                       WIFSIGNALED(status) ? fmt::format("signal {}", WTERMSIG(status))
                                           : fmt::format("exit code {}", WEXITSTATUS(status)));
    if (FindMount(mountpoint)) {
      pid_t pid = ::fork();
      if (pid == 0) {
        int null = ::open("/dev/null", O_WRONLY);
        if (null >= 0) ::dup2(null, 2);
        ::execlp("fusermount3", "fusermount3", "-u", "-z", mountpoint.c_str(), nullptr);
        ::_exit(127);
      }
      if (pid > 0) ::waitpid(pid, &status, 0);
    }
  }
  std::fprintf(stderr, "nemofs: %s\n", line.c_str());
  return kExitMount;
}

// fuse_opt splits -o values at commas: a source path with a comma (or a
// backslash) must be escaped to stay one fsname.
std::string EscapeOpt(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == ',' || c == '\\') out.push_back('\\');
    out.push_back(c);
  }
  return out;
}

}  // namespace

int MountAndServe(Filesystem& fs, const FuseMountConfig& config) {
  Context ctx;
  ctx.fs = &fs;
  for (const auto& o : config.fuse_options) {
    if (o.rfind("max_read=", 0) == 0) ctx.max_read = static_cast<uint32_t>(std::atol(o.c_str() + 9));
  }
  fuse_set_log_func(FuseLog);

  std::vector<std::string> argv_storage = {"nemofs"};
  std::string opts = fmt::format("fsname=nemofs:{},subtype=nemofs,default_permissions",
                                 EscapeOpt(config.source));
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
    std::string why = LastFuseError();
    spdlog::error("{}: cannot create a FUSE session: {}", config.mountpoint,
                  why.empty() ? "bad -o option" : why);
    return kExitUsage;
  }
  if (fuse_set_signal_handlers(se.get()) != 0) {
    spdlog::error("cannot install signal handlers");
    return kExitMount;
  }
  if (fuse_session_mount(se.get(), config.mountpoint.c_str()) != 0) {
    fuse_remove_signal_handlers(se.get());
    std::string why = LastFuseError();
    spdlog::error("{}: mount failed: {}", config.mountpoint,
                  why.empty() ? "is /dev/fuse available and fusermount3 installed?" : why);
    return kExitMount;
  }
  ctx.bdi = MountDevice(config.mountpoint).value_or("");

  // Daemonize: the parent returns only when the daemon reports that the
  // kernel completed INIT (or that it failed), with the daemon's message.
  std::shared_ptr<Readiness> ready;
  if (!config.foreground) {
    int pipefd[2];
    if (::pipe2(pipefd, O_CLOEXEC) != 0) {
      spdlog::error("cannot create the readiness pipe: {}", std::strerror(errno));
      fuse_session_unmount(se.get());
      return kExitMount;
    }
    std::fflush(nullptr);
    pid_t child = ::fork();
    if (child < 0) {
      spdlog::error("cannot fork the daemon: {}", std::strerror(errno));
      fuse_session_unmount(se.get());
      return kExitMount;
    }
    if (child > 0) {
      ::close(pipefd[1]);
      std::_Exit(AwaitDaemon(pipefd[0], child, config.mountpoint));  // the daemon owns the mount now
    }
    ::close(pipefd[0]);
    if (config.in_daemon) config.in_daemon();
    ::setsid();
    if (::chdir("/") != 0) spdlog::debug("chdir /: {}", std::strerror(errno));
    int null = ::open("/dev/null", O_RDWR | O_CLOEXEC);
    if (null >= 0) {
      ::dup2(null, 0);
      ::dup2(null, 1);
      ::dup2(null, 2);
      if (null > 2) ::close(null);
    }
    ready = std::make_shared<Readiness>(pipefd[1]);
    std::thread(WaitUntilReady, ready, config.mountpoint).detach();
  }
  spdlog::info("mounted {} on {} ({} nodes)", config.source, config.mountpoint, fs.node_count());

  // After the fork: the daemon's own thread.
  auto invalidator = std::make_unique<Invalidator>(se.get());
  fs.SetInvalidator([inv = invalidator.get()](const std::vector<uint64_t>& inos) { inv->Add(inos); });
  fs.SetEntryInvalidator(
      [inv = invalidator.get()](const std::vector<std::pair<uint64_t, std::string>>& entries) {
        inv->AddEntries(entries);
      });
  std::unique_ptr<fuse_loop_config, LoopConfigDeleter> loop(fuse_loop_cfg_create());
  fuse_loop_cfg_set_clone_fd(loop.get(), 1);
  fuse_loop_cfg_set_idle_threads(loop.get(), 4);
  fuse_loop_cfg_set_max_threads(loop.get(), 16);
  int rc = fuse_session_loop_mt(se.get(), loop.get());
  fs.SetInvalidator(nullptr);
  fs.SetEntryInvalidator(nullptr);
  invalidator.reset();
  fuse_session_unmount(se.get());
  fuse_remove_signal_handlers(se.get());
  // New files still in memory go into the checkpoint before the daemon
  // exits (`nemofs umount` waits for that exit).
  if (auto st = fs.StoreNewFiles(); !st) {
    spdlog::error("{}: {}", config.mountpoint, st.error().message());
    if (ready) ready->Report("error: " + st.error().message());
    return kExitFailure;
  }
  // The loop returns 0 after fusermount3 -u, the signal number after
  // SIGTERM/SIGINT/SIGHUP (both clean ends), -errno on failure.
  if (rc < 0) {
    std::string why = LastFuseError();
    if (why.empty()) why = std::strerror(-rc);
    if (ready) ready->Report(fmt::format("error: {}: FUSE failed: {}", config.mountpoint, why));
    spdlog::error("unmounted {} after a FUSE error: {}", config.mountpoint, why);
    return kExitMount;
  }
  if (ready) ready->Report("error: " + config.mountpoint + ": unmounted before it was ready");
  spdlog::info("unmounted {}{}", config.mountpoint,
               rc > 0 ? fmt::format(" on signal {}", rc) : std::string());
  return kExitOk;
}

}  // namespace nemofs::mountcmd
