#include "write/config_commit.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstring>

#include "source/source.h"
#include "source/tar_index.h"
#include "util/atomic_replace.h"
#include "util/fd.h"
#include "util/io.h"
#include "write/fault.h"
#include "write/folder_txn.h"
#include "write/journal.h"
#include "nemofs/source_lock.h"
#include "write/rewrite.h"
#include "write/tar_append.h"
#include "write/tar_writer.h"

namespace nemofs::write {
namespace {

FileIdentity FromStat(const struct stat& st) {
  return {st.st_dev, st.st_ino, st.st_size, st.st_mtim.tv_sec, st.st_mtim.tv_nsec};
}

// Removes `<dir>/<prefix><pid>` files whose process is gone (the archive
// kinds: the folder holding the archive file). Best effort.
void RemoveStaleTemps(const std::string& dir, const std::string& prefix) {
  UniqueFd fd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (fd.valid()) RemoveStaleTempsAt(fd.get(), dir, prefix);
}

}  // namespace

std::string WhyReadOnly(const std::string& path, bool need_dir) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return fmt::format("{}: {}", path, std::strerror(errno));
  if ((st.st_mode & 0222) == 0) return fmt::format("{} has no write permission", path);
  struct statvfs vfs {};
  if (::statvfs(path.c_str(), &vfs) == 0 && (vfs.f_flag & ST_RDONLY)) {
    return fmt::format("{} is on a read-only file system", path);
  }
  if (::access(path.c_str(), W_OK) != 0) {
    return fmt::format("{} is not writable: {}", path, std::strerror(errno));
  }
  std::string dir = DirOf(path);
  if (need_dir && ::access(dir.c_str(), W_OK) != 0) {
    return fmt::format("directory {} is not writable: {}", dir, std::strerror(errno));
  }
  return "";
}


Result<FileIdentity> IdentityOf(const std::string& path) {
  NEMOFS_ASSIGN_OR_RETURN(struct stat st, Stat(path));
  return FromStat(st);
}

ConfigCommitter::~ConfigCommitter() = default;

Result<std::unique_ptr<ConfigCommitter>> ConfigCommitter::Create(const source::Source& src,
                                                                 const std::string& config,
                                                                 const FileIdentity& identity) {
  std::unique_ptr<ConfigCommitter> c(new ConfigCommitter());
  c->config_ = config;
  c->identity_ = identity;
  // Write the file itself, never replace a symbolic link leading to it.
  auto real_path = [](const std::string& path) -> Result<std::string> {
    char* real = ::realpath(path.c_str(), nullptr);
    if (!real) return Err(EROFS, "{}: {}", path, std::strerror(errno));
    std::string out = real;
    std::free(real);
    return out;
  };
  if (src.storage() == source::Storage::kPlainTar) {
    c->kind_ = Kind::kPlainTar;
    NEMOFS_ASSIGN_OR_RETURN(c->target_, real_path(src.path()));
    const source::TarIndex& index = *src.tar_index();
    const source::TarMember* member = nullptr;
    for (const auto& m : index.members) {
      std::string norm;
      if ((m.type == '0' || m.type == '\0' || m.type == '7') &&
          source::NormalizePath(m.name, &norm) && norm == config) {
        member = &m;
      }
    }
    if (config.empty()) {
      // Only in-place patches: no member to supersede, nothing appended.
    } else if (!member) {
      return Err(EROFS, "{}: no regular member '{}' to replace", src.path(), config);
    } else if (!index.has_end_marker) {
      return Err(EROFS,
                 "{}: the archive has no end-of-archive marker, so nothing can be appended "
                 "safely (`nemofs repack` writes a complete copy)",
                 src.path());
    }
    if (member) {
      c->member_name_ = member->name;
      c->mode_ = member->mode ? member->mode & 07777 : 0644;
      c->member_header_ = member->data_offset - kBlock;  // the ustar header precedes the data
    }
    c->end_ = index.end_offset;
  } else if (src.storage() == source::Storage::kCompressedTar) {
    c->kind_ = Kind::kCompressedTar;
    NEMOFS_ASSIGN_OR_RETURN(c->target_, real_path(src.path()));
    c->filter_ = src.Kind();
  } else if (src.storage() == source::Storage::kFolder) {
    c->kind_ = Kind::kFolder;
    NEMOFS_ASSIGN_OR_RETURN(c->folder_root_, real_path(src.path()));
    c->folder_root_fd_ = UniqueFd(::fcntl(src.folder_fd(), F_DUPFD_CLOEXEC, 0));
    if (!c->folder_root_fd_.valid()) {
      return Err(errno, "{}: {}", c->folder_root_, std::strerror(errno));
    }
    if (config.empty()) {
      c->target_ = c->folder_root_;
      std::string why = WhyReadOnly(c->target_, true);
      if (!why.empty()) return Err(EROFS, "{}", why);
      return c;
    }
    NEMOFS_ASSIGN_OR_RETURN(c->target_, real_path(src.path() + "/" + config));
    // Commits write relative to the folder's descriptor: the config (a link
    // to it followed once, here) must be inside the folder.
    const std::string& root = c->folder_root_;
    const std::string prefix = root == "/" ? root : root + "/";
    if (c->target_.compare(0, prefix.size(), prefix) != 0) {
      return Err(EROFS, "{}: {} is outside the source folder", src.path(), c->target_);
    }
    c->config_rel_ = c->target_.substr(prefix.size());
    NEMOFS_ASSIGN_OR_RETURN(struct stat st, Stat(c->target_));
    c->identity_ = FromStat(st);
    c->mode_ = st.st_mode & 07777;
  } else if (src.storage() == source::Storage::kFile && config.empty()) {
    c->kind_ = Kind::kFile;
    NEMOFS_ASSIGN_OR_RETURN(c->target_, real_path(src.path()));
  } else {
    return Err(EROFS, "{}: a {} source has no config to write", src.path(), src.Kind());
  }
  // The journal of a patch goes beside a file source (write/journal.h).
  std::string why = WhyReadOnly(c->target_, c->kind_ != Kind::kPlainTar || config.empty());
  if (!why.empty()) return Err(EROFS, "{}", why);
  return c;
}

std::string ConfigCommitter::Describe() const {
  switch (kind_) {
    case Kind::kPlainTar:
      return "append to the plain tar";
    case Kind::kCompressedTar:
      return "rewrite of the " + filter_;
    case Kind::kFolder:
      return "file replace in the folder";
    case Kind::kFile:
      return "in-place patch of the file";
  }
  return "";
}

Status ConfigCommitter::CheckIdentity(const FileIdentity& now) const {
  if (now == identity_) return Ok();
  return Err(ESTALE,
             "{} was changed or replaced by something else since it was mounted (size {} -> {}, "
             "inode {} -> {}); refusing to write into it. Unmount and mount again.",
             target_, identity_.size, now.size, identity_.ino, now.ino);
}

Status ConfigCommitter::Commit(const std::string& text, const struct timespec& mtime,
                               const std::function<void(uint64_t, uint64_t)>& progress) {
  switch (kind_) {
    case Kind::kPlainTar:
      return CommitPlainTar(text, mtime.tv_sec);
    case Kind::kFolder:
      return CommitFolder(text, mtime);
    case Kind::kCompressedTar: {
      NEMOFS_ASSIGN_OR_RETURN(FileIdentity now, IdentityOf(target_));
      NEMOFS_RETURN_IF_ERROR(CheckIdentity(now));
      RemoveStaleTemps(DirOf(target_), target_.substr(target_.rfind('/') + 1) + ".nemofs-rewrite.");
      NEMOFS_RETURN_IF_ERROR(RewriteCompressedTar(target_, config_, text, mtime.tv_sec, progress));
      NEMOFS_ASSIGN_OR_RETURN(identity_, IdentityOf(target_));
      return Ok();
    }
    case Kind::kFile:
      break;
  }
  return Err(EROFS, "{}: has no config to write", target_);
}

Status ConfigCommitter::CommitPlainTar(const std::string& text, int64_t mtime) {
  return AppendToPlainTar({NewMember{member_name_, text, mtime, mode_, ""}});
}

Status ConfigCommitter::AppendToPlainTar(std::vector<NewMember> members) {
  UniqueFd fd(::open(target_.c_str(), O_RDWR | O_CLOEXEC));
  if (!fd.valid()) {
    int e = errno;
    return Err(e, "{}: cannot open for writing: {}", target_, std::strerror(e));
  }
  NEMOFS_ASSIGN_OR_RETURN(struct stat st, FStat(fd.get(), target_));
  NEMOFS_RETURN_IF_ERROR(CheckIdentity(FromStat(st)));
  // The append overwrites what follows the end marker (the record padding,
  // or what an interrupted save left): keep it, to put the file back byte
  // for byte if the append fails (a full disk).
  // (What a crashed save left there can be large: past 16 MiB it is junk
  // past the end marker either way, and only its size is put back.)
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  std::string tail(std::min<uint64_t>(size > end_ ? size - end_ : 0, 16u << 20), '\0');
  NEMOFS_RETURN_IF_ERROR(PreadFull(fd.get(), tail.data(), tail.size(), end_, target_));
  // New copies (and new files) keep the owner of the config copy they
  // supersede.
  std::string owner(kBlock, '\0');
  if (!PreadFull(fd.get(), owner.data(), owner.size(), member_header_, target_).ok()) owner.clear();
  for (auto& m : members) m.owner_from = owner;
  auto appended = AppendTarMembers(fd.get(), end_, members, target_);
  if (!appended) {
    // Nothing visible changed (the old end marker is intact): restore the
    // bytes after it and the size. Its mtime did change: that is ours.
    bool restored = PwriteFull(fd.get(), tail, end_, target_).ok() &&
                    ::ftruncate(fd.get(), st.st_size) == 0 && ::fsync(fd.get()) == 0;
    // Either way only this save touched the file: later saves may go on.
    if (auto now = FStat(fd.get(), target_); now.ok()) identity_ = FromStat(*now);
    if (!restored) {
      spdlog::error("{}: could not restore the bytes after the end-of-archive marker after a "
                    "failed save; the archive is valid (the marker is intact) but has {} "
                    "bytes of junk after it",
                    target_, tail.size());
    }
    return appended.error();
  }
  end_ = appended->new_end;
  NEMOFS_ASSIGN_OR_RETURN(struct stat after, FStat(fd.get(), target_));
  identity_ = FromStat(after);
  return Ok();
}

Result<UniqueFd> ConfigCommitter::OpenFolder(const std::string& rel, bool create) const {
  struct stat root_st {};
  if (::fstat(folder_root_fd_.get(), &root_st) != 0) {
    return Err(errno, "{}: {}", folder_root_, std::strerror(errno));
  }
  return OpenFolderBeneath(folder_root_fd_.get(), folder_root_, rel, create, 0755,
                           std::make_pair(root_st.st_uid, root_st.st_gid));
}

namespace {

std::string BaseOf(const std::string& path) { return path.substr(path.rfind('/') + 1); }

std::string FolderOf(const std::string& rel) {
  return rel.find('/') == std::string::npos ? "" : DirOf(rel);
}

std::string JoinShown(const std::string& root, const std::string& rel) {
  return rel.empty() ? root : root + "/" + rel;
}

}  // namespace

Status ConfigCommitter::CommitFolder(const std::string& text, const struct timespec& mtime) {
  const std::string parent = FolderOf(config_rel_);
  const std::string base = BaseOf(config_rel_);
  NEMOFS_ASSIGN_OR_RETURN(UniqueFd dir, OpenFolder(parent, false));
  struct stat orig {};
  if (::fstatat(dir.get(), base.c_str(), &orig, AT_SYMLINK_NOFOLLOW) != 0) {
    return Err(errno, "{}: {}", target_, std::strerror(errno));
  }
  NEMOFS_RETURN_IF_ERROR(CheckIdentity(FromStat(orig)));
  const std::string shown = JoinShown(folder_root_, parent);
  NEMOFS_RETURN_IF_ERROR(ReplaceFolderFile(dir.get(), shown, base, text, mode_, orig.st_uid,
                                           orig.st_gid, &mtime));
  struct stat now {};
  if (::fstatat(dir.get(), base.c_str(), &now, AT_SYMLINK_NOFOLLOW) != 0) {
    return Err(errno, "{}: {}", target_, std::strerror(errno));
  }
  identity_ = FromStat(now);
  return Ok();
}

Status ConfigCommitter::ReplaceFolderFile(int dirfd, const std::string& shown_dir,
                                          const std::string& name, std::string_view data,
                                          uint32_t mode, uid_t uid, gid_t gid,
                                          const struct timespec* mtime) {
  const std::string prefix = fmt::format(".{}{}", name, source::kCommitTempMarker);
  RemoveStaleTempsAt(dirfd, shown_dir, prefix);
  ReplaceOptions options;
  options.temp_path = fmt::format("{}{}", prefix, ::getpid());
  options.mode = mode;
  options.owner = std::make_pair(uid, gid);
  options.folder_sync_is_error = true;
  options.on_written = [] { MaybeCrash("folder:written"); };
  options.on_renamed = [] { MaybeCrash("folder:renamed"); };
  const std::string tmp_shown = shown_dir + "/" + options.temp_path;
  return ReplaceFileAt(dirfd, shown_dir, name, options, [&](int fd) -> Status {
    NEMOFS_RETURN_IF_ERROR(PwriteFull(fd, data, 0, tmp_shown));
    if (mtime) {
      struct timespec times[2] = {{0, UTIME_OMIT}, *mtime};
      if (::futimens(fd, times) != 0) {
        return Err(errno, "{}: cannot set mtime", tmp_shown);
      }
    }
    return Ok();
  });
}

Status ConfigCommitter::RewriteArchive(const std::vector<NewFile>& files,
                                       const std::vector<std::string>& drop,
                                       const std::function<void(uint64_t, uint64_t)>& progress) {
  if (kind_ != Kind::kPlainTar && kind_ != Kind::kCompressedTar) {
    return Err(EINVAL, "{}: not an archive", target_);
  }
  NEMOFS_ASSIGN_OR_RETURN(FileIdentity now, IdentityOf(target_));
  NEMOFS_RETURN_IF_ERROR(CheckIdentity(now));
  RemoveStaleTemps(DirOf(target_), target_.substr(target_.rfind('/') + 1) + ".nemofs-rewrite.");
  const bool dot = kind_ == Kind::kPlainTar && member_name_.rfind("./", 0) == 0;
  std::vector<NewMember> members;
  for (const auto& f : files) {
    members.push_back(NewMember{(dot ? "./" : "") + f.path, f.data, f.mtime_sec, f.mode & 07777, ""});
  }
  NEMOFS_RETURN_IF_ERROR(RewriteCompressedTar(target_, "", "", 0, progress, members, {}, drop));
  NEMOFS_ASSIGN_OR_RETURN(identity_, IdentityOf(target_));
  if (kind_ == Kind::kPlainTar) {
    // Where the next append goes, and the config's header, in the new file.
    NEMOFS_ASSIGN_OR_RETURN(UniqueFd fd, OpenReadOnly(target_));
    NEMOFS_ASSIGN_OR_RETURN(struct stat st, FStat(fd.get(), target_));
    NEMOFS_ASSIGN_OR_RETURN(source::TarIndex index,
                            source::IndexTar(fd.get(), 0, static_cast<uint64_t>(st.st_size), target_));
    for (const auto& m : index.members) {
      std::string norm;
      if ((m.type == '0' || m.type == '\0' || m.type == '7') &&
          source::NormalizePath(m.name, &norm) && !config_.empty() && norm == config_) {
        member_name_ = m.name;
        member_header_ = m.data_offset - kBlock;
      }
    }
    end_ = index.end_offset;
  }
  return Ok();
}

Status ConfigCommitter::StoreFiles(const std::vector<NewFile>& files,
                                   const std::function<void(uint64_t, uint64_t)>& progress) {
  if (files.empty()) return Ok();
  switch (kind_) {
    case Kind::kPlainTar: {
      const bool dot = member_name_.rfind("./", 0) == 0;
      std::vector<NewMember> members;
      for (const auto& f : files) {
        members.push_back(NewMember{(dot ? "./" : "") + f.path, f.data, f.mtime_sec,
                                    f.mode & 07777, "", f.writer});
      }
      return AppendToPlainTar(std::move(members));
    }
    case Kind::kCompressedTar: {
      NEMOFS_ASSIGN_OR_RETURN(FileIdentity now, IdentityOf(target_));
      NEMOFS_RETURN_IF_ERROR(CheckIdentity(now));
      RemoveStaleTemps(DirOf(target_), target_.substr(target_.rfind('/') + 1) + ".nemofs-rewrite.");
      std::vector<NewMember> members;
      for (const auto& f : files) {
        members.push_back(NewMember{f.path, f.data, f.mtime_sec, f.mode & 07777, ""});
      }
      NEMOFS_RETURN_IF_ERROR(RewriteCompressedTar(target_, "", "", 0, progress, members));
      NEMOFS_ASSIGN_OR_RETURN(identity_, IdentityOf(target_));
      return Ok();
    }
    case Kind::kFile:
      return Err(EROFS, "{}: new files cannot be stored in a single-file checkpoint", target_);
    case Kind::kFolder: {
      struct stat root_st {};
      if (::fstat(folder_root_fd_.get(), &root_st) != 0) {
        return Err(errno, "{}: {}", folder_root_, std::strerror(errno));
      }
      for (const auto& f : files) {
        const std::string parent = FolderOf(f.path);
        const std::string base = BaseOf(f.path);
        const std::string target = JoinShown(folder_root_, f.path);
        NEMOFS_ASSIGN_OR_RETURN(UniqueFd dir, OpenFolder(parent, true));
        struct stat st {};
        if (!f.stored_before && ::fstatat(dir.get(), base.c_str(), &st, AT_SYMLINK_NOFOLLOW) == 0) {
          return Err(EEXIST, "{}: exists already (created beside the mount?); not replaced",
                     target);
        }
        struct timespec mtime {
          f.mtime_sec, static_cast<long>(f.mtime_nsec)
        };
        NEMOFS_RETURN_IF_ERROR(ReplaceFolderFile(dir.get(), JoinShown(folder_root_, parent), base,
                                                 f.data, f.mode & 07777, root_st.st_uid,
                                                 root_st.st_gid, &mtime));
      }
      return Ok();
    }
  }
  return Err(EINVAL, "unknown commit kind");
}

Status ConfigCommitter::ReplaceSingleFile(std::string_view data,
                                          const std::function<void(uint64_t, uint64_t)>& progress) {
  if (kind_ != Kind::kFile) {
    return Err(EINVAL, "{}: not a single-file checkpoint", target_);
  }
  struct stat st {};
  if (::stat(target_.c_str(), &st) != 0) return Err(errno, "{}: {}", target_, std::strerror(errno));
  NEMOFS_RETURN_IF_ERROR(CheckIdentity(FromStat(st)));
  const std::string dir = DirOf(target_);
  const std::string base = target_.substr(target_.rfind('/') + 1);
  UniqueFd dirfd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!dirfd.valid()) return Err(errno, "{}: {}", dir, std::strerror(errno));
  const std::string prefix = fmt::format(".{}{}", base, source::kCommitTempMarker);
  RemoveStaleTempsAt(dirfd.get(), dir, prefix);
  ReplaceOptions options;
  options.temp_path = fmt::format("{}{}", prefix, ::getpid());
  options.mode = st.st_mode & 07777;
  options.owner = std::make_pair(st.st_uid, st.st_gid);
  options.folder_sync_is_error = true;
  options.on_written = [] { MaybeCrash("file:written"); };
  options.on_renamed = [] { MaybeCrash("file:renamed"); };
  const std::string tmp_shown = dir + "/" + options.temp_path;
  NEMOFS_RETURN_IF_ERROR(ReplaceFileAt(dirfd.get(), dir, base, options, [&](int fd) -> Status {
    constexpr size_t kStep = 64 << 20;
    for (size_t at = 0; at < data.size(); at += kStep) {
      NEMOFS_RETURN_IF_ERROR(
          PwriteFull(fd, data.substr(at, std::min(kStep, data.size() - at)), at, tmp_shown));
      if (progress) progress(std::min(at + kStep, data.size()), data.size());
    }
    return Ok();
  }));
  NEMOFS_ASSIGN_OR_RETURN(identity_, IdentityOf(target_));
  return Ok();
}

Status ConfigCommitter::PatchInPlace(const std::vector<Patch>& data,
                                     const std::vector<Patch>& meta,
                                     const std::function<void(uint64_t, uint64_t)>& progress) {
  if (data.empty() && meta.empty()) return Ok();
  for (const auto* list : {&data, &meta}) {
    for (const auto& p : *list) {
      if (p.to_end && kind_ != Kind::kFolder) {
        return Err(EINVAL, "{}: only a folder's files can change size in a patch", target_);
      }
    }
  }
  PatchRoot root;
  UniqueFd dir;
  std::string file_name;  // the source file's name in `dir` (file kinds)
  switch (kind_) {
    case Kind::kCompressedTar: {
      NEMOFS_ASSIGN_OR_RETURN(FileIdentity now, IdentityOf(target_));
      NEMOFS_RETURN_IF_ERROR(CheckIdentity(now));
      RemoveStaleTemps(DirOf(target_), BaseOf(target_) + ".nemofs-rewrite.");
      std::vector<MemberPatch> patches;
      for (const auto* list : {&data, &meta}) {
        for (const auto& p : *list) {
          patches.push_back(MemberPatch{p.member_index, p.member, p.offset, p.bytes});
        }
      }
      NEMOFS_RETURN_IF_ERROR(RewriteCompressedTar(target_, "", "", 0, progress, {}, patches));
      NEMOFS_ASSIGN_OR_RETURN(identity_, IdentityOf(target_));
      return Ok();
    }
    case Kind::kFolder: {
      NEMOFS_ASSIGN_OR_RETURN(dir, OpenFolder("", false));
      root.shown_dir = folder_root_;
      root.journal_name = std::string(source::kFolderJournalName);
      break;
    }
    case Kind::kPlainTar:
    case Kind::kFile: {
      NEMOFS_ASSIGN_OR_RETURN(FileIdentity now, IdentityOf(target_));
      NEMOFS_RETURN_IF_ERROR(CheckIdentity(now));
      root.shown_dir = DirOf(target_);
      dir = UniqueFd(::open(root.shown_dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
      if (!dir.valid()) {
        return Err(errno, "{}: cannot open the folder: {}", root.shown_dir, std::strerror(errno));
      }
      file_name = BaseOf(target_);
      root.journal_name = file_name + std::string(source::kJournalSuffix);
      break;
    }
  }
  root.dir_fd = dir.get();
  auto regions = [&](const std::vector<Patch>& patches) {
    std::vector<Region> out;
    out.reserve(patches.size());
    for (const auto& p : patches) {
      out.push_back(Region{p.file.empty() ? file_name : p.file, p.offset, p.bytes, p.old, p.to_end});
    }
    return out;
  };
  Status st = ApplyPatch(root, regions(data), regions(meta), progress);
  if (kind_ != Kind::kFolder) {
    // Our own change of the file (its mtime) is not someone else's.
    if (auto now = IdentityOf(target_); now.ok()) identity_ = *now;
  }
  return st;
}

Result<std::string> RollBackInterruptedPatch(const std::string& source_path, bool may_write,
                                             bool lock_held) {
  NEMOFS_ASSIGN_OR_RETURN(struct stat st, Stat(source_path));
  char* real = ::realpath(source_path.c_str(), nullptr);
  if (!real) return Err(errno, "{}: {}", source_path, std::strerror(errno));
  const std::string path = real;
  std::free(real);
  PatchRoot root;
  if (S_ISDIR(st.st_mode)) {
    root.shown_dir = path;
    root.journal_name = std::string(source::kFolderJournalName);
  } else {
    root.shown_dir = DirOf(path);
    root.journal_name = BaseOf(path) + std::string(source::kJournalSuffix);
  }
  UniqueFd dir(::open(root.shown_dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!dir.valid()) {
    return Err(errno, "{}: cannot open the folder: {}", root.shown_dir, std::strerror(errno));
  }
  root.dir_fd = dir.get();
  NEMOFS_ASSIGN_OR_RETURN(bool hot, HasHotJournal(root));
  // A folder's multi-path commit past its commit point (write/folder_txn.h).
  const bool unfinished = S_ISDIR(st.st_mode) && HasFolderCommitJournal(root.dir_fd);
  if (!hot && !unfinished) return std::string();
  const std::string journal =
      root.shown_dir + "/" + (hot ? root.journal_name : std::string(kFolderCommitJournal));
  std::string why = may_write ? WhyReadOnly(path, true) : "it was opened read-only";
  if (!why.empty() && !hot) {
    return Err(EROFS,
               "{}: a commit into it was interrupted past its commit point ({}) and must be "
               "finished before it can be read, but {}. Run `nemofs verify {}` as a user who can "
               "write it (or mount it without -o ro) to finish it.",
               source_path, journal, why, source_path);
  }
  if (!why.empty()) {
    return Err(EROFS,
               "{}: a write into it was interrupted (hot journal {}) and must be rolled back "
               "before it can be read, but {}. Run `nemofs verify {}` as a user who can write it "
               "(or mount it without -o ro) to roll it back.",
               source_path, journal, why, source_path);
  }
  std::unique_ptr<SourceLock> lock;
  if (!lock_held) {
    auto locked = SourceLock::Acquire(path);
    if (locked) {
      lock = std::move(locked).value();
    } else if (locked.error().code() == EBUSY) {
      spdlog::warn("{}: a write into it is in progress ({}); reading it meanwhile may show part "
                   "of that write",
                   source_path, locked.error().message());
      return std::string();
    }  // a lock that cannot be taken here at all (NFS): nobody else can hold it either
  }
  std::string msg;
  if (hot) {
    NEMOFS_ASSIGN_OR_RETURN(std::string done, RollBackHotJournal(root));
    msg = fmt::format("{}: an interrupted write was rolled back ({}): {}", source_path, journal,
                      done);
    spdlog::warn("{}", msg);
  }
  if (unfinished) {
    // Finished, the checkpoint is the new one and whole: logged, not a
    // problem of the source (verify passes).
    NEMOFS_ASSIGN_OR_RETURN(std::string done, FinishFolderCommit(root.dir_fd, path));
    spdlog::warn("{}", done);
  }
  return msg;
}

}  // namespace nemofs::write
