#include "write/folder_txn.h"

#include <dirent.h>
#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <map>
#include <nlohmann/json.hpp>
#include <set>

#include "source/source.h"
#include "util/atomic_replace.h"
#include "util/io.h"
#include "write/fault.h"

namespace nemofs::write {
namespace {

static_assert(source::kFolderCommitJournalName == kFolderCommitJournal);
constexpr char kPhaseTwoMarker[] = "in";
constexpr int kJournalVersion = 1;

// A path nemofs may name in a journal: relative, normal, no "." or ".."
// component, not one of nemofs's own files.
bool SafeRel(const std::string& rel) {
  if (rel.empty() || rel.front() == '/' || rel.back() == '/') return false;
  size_t at = 0;
  while (at <= rel.size()) {
    size_t slash = rel.find('/', at);
    if (slash == std::string::npos) slash = rel.size();
    const std::string_view part(rel.data() + at, slash - at);
    if (part.empty() || part == "." || part == "..") return false;
    at = slash + 1;
  }
  return rel.rfind(kFolderCommitJournal, 0) != 0 && rel.rfind(kFolderCommitStagePrefix, 0) != 0;
}

void SplitRel(const std::string& rel, std::string* dir, std::string* base) {
  const auto slash = rel.rfind('/');
  *dir = slash == std::string::npos ? "" : rel.substr(0, slash);
  *base = slash == std::string::npos ? rel : rel.substr(slash + 1);
}

bool ExistsAt(int dirfd, const std::string& name) {
  struct stat st {};
  return ::fstatat(dirfd, name.c_str(), &st, AT_SYMLINK_NOFOLLOW) == 0;
}

Status FsyncFd(int fd, const std::string& what) {
  if (::fsync(fd) != 0) return Err(errno, "{}: fsync: {}", what, std::strerror(errno));
  return Ok();
}

// Removes `name` in `dirfd` and, for a folder, all it holds, never
// following a symbolic link. ENOENT is no error.
Status RemoveTreeAt(int dirfd, const std::string& name, const std::string& shown) {
  struct stat st {};
  if (::fstatat(dirfd, name.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0) {
    return errno == ENOENT ? Ok() : Err(errno, "{}: {}", shown, std::strerror(errno));
  }
  if (!S_ISDIR(st.st_mode)) {
    if (::unlinkat(dirfd, name.c_str(), 0) != 0 && errno != ENOENT) {
      return Err(errno, "{}: cannot remove: {}", shown, std::strerror(errno));
    }
    return Ok();
  }
  const int fd = ::openat(dirfd, name.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) return Err(errno, "{}: {}", shown, std::strerror(errno));
  DIR* d = ::fdopendir(fd);
  if (!d) {
    ::close(fd);
    return Err(errno, "{}: {}", shown, std::strerror(errno));
  }
  std::vector<std::string> names;
  while (struct dirent* e = ::readdir(d)) {
    const std::string n = e->d_name;
    if (n != "." && n != "..") names.push_back(n);
  }
  Status first = Ok();
  for (const auto& n : names) {
    Status s = RemoveTreeAt(::dirfd(d), n, shown + "/" + n);
    if (!s.ok() && first.ok()) first = s;
  }
  ::closedir(d);
  if (::unlinkat(dirfd, name.c_str(), AT_REMOVEDIR) != 0 && errno != ENOENT && first.ok()) {
    first = Err(errno, "{}: cannot remove: {}", shown, std::strerror(errno));
  }
  return first;
}

struct Journal {
  std::string stage;
  std::vector<std::string> out;
  std::vector<std::pair<std::string, std::string>> in;  // (stage-relative from, root-relative to)
};

std::string JournalText(const Journal& j) {
  nlohmann::json doc;
  doc["nemofs_folder_commit"] = kJournalVersion;
  doc["stage"] = j.stage;
  doc["out"] = j.out;
  doc["in"] = nlohmann::json::array();
  for (const auto& [from, to] : j.in) doc["in"].push_back({from, to});
  return doc.dump() + "\n";
}

Result<Journal> ParseJournal(const std::string& text, const std::string& shown) {
  auto bad = [&](const std::string& why) {
    return Err(EIO, "{}: not a nemofs commit journal ({}); the commit it may record cannot be "
               "finished. Look at it, then remove it by hand",
               shown, why);
  };
  auto doc = nlohmann::json::parse(text, nullptr, false);
  if (doc.is_discarded() || !doc.is_object()) return bad("not a JSON object");
  Journal j;
  try {
    if (doc.at("nemofs_folder_commit").get<int>() != kJournalVersion) return bad("unknown version");
    j.stage = doc.at("stage").get<std::string>();
    j.out = doc.at("out").get<std::vector<std::string>>();
    for (const auto& e : doc.at("in")) {
      j.in.emplace_back(e.at(0).get<std::string>(), e.at(1).get<std::string>());
    }
  } catch (const nlohmann::json::exception& ex) {
    return bad(ex.what());
  }
  if (j.stage.rfind(kFolderCommitStagePrefix, 0) != 0 || j.stage.find('/') != std::string::npos ||
      j.stage.size() == std::string_view(kFolderCommitStagePrefix).size()) {
    return bad("bad stage folder name");
  }
  std::set<std::string> seen;
  for (const auto& p : j.out) {
    if (!SafeRel(p) || !seen.insert(p).second) return bad("bad path '" + p + "'");
  }
  std::set<std::string> from_seen, to_seen;
  for (const auto& [from, to] : j.in) {
    if (!SafeRel(to) || !to_seen.insert(to).second) return bad("bad path '" + to + "'");
    const bool is_new = from.rfind("new/", 0) == 0, is_old = from.rfind("old/", 0) == 0;
    const std::string n = from.size() > 4 ? from.substr(4) : "";
    if ((!is_new && !is_old) || n.empty() || n.size() > 9 ||
        n.find_first_not_of("0123456789") != std::string::npos || !from_seen.insert(from).second) {
      return bad("bad stage path '" + from + "'");
    }
    if (is_old && std::stoul(n) >= j.out.size()) return bad("bad stage path '" + from + "'");
  }
  return j;
}

// Phases 1 and 2 (see the header), idempotent.
Status Apply(int root_fd, const std::string& shown, const Journal& j) {
  const std::string stage_shown = shown + "/" + j.stage;
  const int sfd = ::openat(root_fd, j.stage.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (sfd < 0) {
    return Err(errno == ENOENT ? EIO : errno, "{}: the stage folder of a commit: {}", stage_shown,
               std::strerror(errno));
  }
  UniqueFd stage(sfd);
  std::map<std::string, UniqueFd> dirs;  // folders touched, to fsync
  auto dir_of = [&](const std::string& rel, bool create) -> Result<int> {
    std::string dir, base;
    SplitRel(rel, &dir, &base);
    auto it = dirs.find(dir);
    if (it != dirs.end()) return it->second.get();
    NEMOFS_ASSIGN_OR_RETURN(UniqueFd fd, OpenFolderBeneath(root_fd, shown, dir, create));
    const int raw = fd.get();
    dirs.emplace(dir, std::move(fd));
    return raw;
  };
  if (!ExistsAt(stage.get(), kPhaseTwoMarker)) {
    if (::mkdirat(stage.get(), "old", 0700) != 0 && errno != EEXIST) {
      return Err(errno, "{}/old: {}", stage_shown, std::strerror(errno));
    }
    NEMOFS_ASSIGN_OR_RETURN(UniqueFd old, OpenFolderBeneath(stage.get(), stage_shown, "old"));
    for (size_t i = 0; i < j.out.size(); ++i) {
      const std::string slot = std::to_string(i);
      if (ExistsAt(old.get(), slot)) continue;
      std::string dir, base;
      SplitRel(j.out[i], &dir, &base);
      auto dfd = dir_of(j.out[i], false);
      if (!dfd.ok()) {
        if (dfd.error().code() == ENOENT) continue;  // its folder is not there: nothing to move
        return dfd.error();
      }
      if (!ExistsAt(*dfd, base)) continue;
      if (::renameat(*dfd, base.c_str(), old.get(), slot.c_str()) != 0) {
        return Err(errno, "{}/{}: cannot move it aside: {}", shown, j.out[i], std::strerror(errno));
      }
    }
    NEMOFS_RETURN_IF_ERROR(FsyncFd(old.get(), stage_shown + "/old"));
    for (auto& [rel, fd] : dirs) NEMOFS_RETURN_IF_ERROR(FsyncFd(fd.get(), shown + "/" + rel));
    const int m = ::openat(stage.get(), kPhaseTwoMarker, O_WRONLY | O_CREAT | O_CLOEXEC, 0600);
    if (m < 0) return Err(errno, "{}/{}: {}", stage_shown, kPhaseTwoMarker, std::strerror(errno));
    ::close(m);
    NEMOFS_RETURN_IF_ERROR(FsyncFd(stage.get(), stage_shown));
    MaybeCrash("folder-commit:half");
  }
  for (const auto& [from, to] : j.in) {
    std::string from_dir, from_base;
    SplitRel(from, &from_dir, &from_base);
    auto ffd = OpenFolderBeneath(stage.get(), stage_shown, from_dir);
    if (!ffd.ok()) {
      if (ffd.error().code() == ENOENT) continue;
      return ffd.error();
    }
    if (!ExistsAt(ffd->get(), from_base)) continue;  // moved in already
    std::string dir, base;
    SplitRel(to, &dir, &base);
    NEMOFS_ASSIGN_OR_RETURN(int dfd, dir_of(to, true));
    if (::renameat(ffd->get(), from_base.c_str(), dfd, base.c_str()) != 0) {
      return Err(errno, "{}/{}: cannot move it into place: {}", shown, to, std::strerror(errno));
    }
  }
  for (auto& [rel, fd] : dirs) NEMOFS_RETURN_IF_ERROR(FsyncFd(fd.get(), shown + "/" + rel));
  MaybeCrash("folder-commit:applied");
  if (::unlinkat(root_fd, kFolderCommitJournal, 0) != 0 && errno != ENOENT) {
    return Err(errno, "{}/{}: cannot remove the finished journal: {}", shown, kFolderCommitJournal,
               std::strerror(errno));
  }
  NEMOFS_RETURN_IF_ERROR(FsyncFd(root_fd, shown));
  // The old content: gone once the journal is (an orphan if this fails).
  if (Status s = RemoveTreeAt(root_fd, j.stage, stage_shown); !s.ok()) {
    spdlog::warn("{}: the commit is complete, but its stage folder is left ({}); `nemofs repack` "
                 "removes it",
                 shown, s.error().message());
  }
  return Ok();
}

}  // namespace

Result<std::unique_ptr<FolderTransaction>> FolderTransaction::Begin(int root_fd,
                                                                    std::string shown) {
  std::unique_ptr<FolderTransaction> t(new FolderTransaction());
  t->root_fd_ = root_fd;
  t->shown_ = std::move(shown);
  if (HasFolderCommitJournal(root_fd)) {
    return Err(EBUSY, "{}: an unfinished commit ({}) must be finished first (remount)", t->shown_,
               kFolderCommitJournal);
  }
  t->stage_ = std::string(kFolderCommitStagePrefix) + std::to_string(::getpid());
  // A stage of ours a failed commit left (same pid): ours to reuse.
  NEMOFS_RETURN_IF_ERROR(RemoveTreeAt(root_fd, t->stage_, t->shown_ + "/" + t->stage_));
  if (::mkdirat(root_fd, t->stage_.c_str(), 0700) != 0) {
    return Err(errno, "{}: cannot make the commit's stage folder {}: {}", t->shown_, t->stage_,
               std::strerror(errno));
  }
  NEMOFS_ASSIGN_OR_RETURN(t->stage_fd_, OpenFolderBeneath(root_fd, t->shown_, t->stage_));
  if (::mkdirat(t->stage_fd_.get(), "new", 0700) != 0) {
    return Err(errno, "{}/{}/new: {}", t->shown_, t->stage_, std::strerror(errno));
  }
  NEMOFS_ASSIGN_OR_RETURN(t->new_fd_, OpenFolderBeneath(t->stage_fd_.get(), t->shown_, "new"));
  return t;
}

FolderTransaction::~FolderTransaction() {
  if (!committed_ && root_fd_ >= 0 && !stage_.empty()) {
    stage_fd_.Reset();
    new_fd_.Reset();
    (void)RemoveTreeAt(root_fd_, stage_, shown_ + "/" + stage_);
  }
}

Status FolderTransaction::CheckRel(const std::string& rel) const {
  if (!SafeRel(rel)) return Err(EINVAL, "{}: '{}' is not a path a commit can write", shown_, rel);
  return Ok();
}

Result<UniqueFd> FolderTransaction::NewFolder(const std::string& rel, mode_t mode) {
  NEMOFS_RETURN_IF_ERROR(CheckRel(rel));
  const std::string slot = Slot();
  if (::mkdirat(new_fd_.get(), slot.c_str(), mode) != 0) {
    return Err(errno == ENOSPC ? ENOSPC : errno, "{}/{}: {}", shown_, stage_, std::strerror(errno));
  }
  news_.emplace_back("new/" + slot, rel);
  return OpenFolderBeneath(new_fd_.get(), shown_ + "/" + stage_, slot);
}

Status FolderTransaction::NewFile(const std::string& rel, std::string_view data, mode_t mode,
                                  std::optional<std::pair<uid_t, gid_t>> owner) {
  NEMOFS_RETURN_IF_ERROR(CheckRel(rel));
  const std::string slot = Slot();
  const std::string shown = shown_ + "/" + stage_ + "/new/" + slot;
  UniqueFd fd(::openat(new_fd_.get(), slot.c_str(),
                       O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, mode));
  if (!fd.valid()) return Err(errno, "{}: {}", shown, std::strerror(errno));
  NEMOFS_RETURN_IF_ERROR(WriteFull(fd.get(), data.data(), data.size(), shown));
  if (owner) (void)!::fchown(fd.get(), owner->first, owner->second);
  if (::fchmod(fd.get(), mode) != 0) return Err(errno, "{}: {}", shown, std::strerror(errno));
  NEMOFS_RETURN_IF_ERROR(FsyncFd(fd.get(), shown));
  news_.emplace_back("new/" + slot, rel);
  return Ok();
}

Status FolderTransaction::Remove(const std::string& rel) {
  NEMOFS_RETURN_IF_ERROR(CheckRel(rel));
  out_.push_back(rel);
  return Ok();
}

Status FolderTransaction::Move(const std::string& from, const std::string& to) {
  NEMOFS_RETURN_IF_ERROR(CheckRel(from));
  NEMOFS_RETURN_IF_ERROR(CheckRel(to));
  moves_.emplace_back(from, to);
  return Ok();
}

Status FolderTransaction::Commit() {
  Journal j;
  j.stage = stage_;
  std::map<std::string, size_t> slot_of;
  auto out = [&](const std::string& p) {
    auto [it, fresh] = slot_of.emplace(p, j.out.size());
    if (fresh) j.out.push_back(p);
    return it->second;
  };
  for (const auto& p : out_) out(p);
  std::set<std::string> targets;
  for (const auto& [from, to] : moves_) {
    if (!targets.insert(to).second) return Err(EINVAL, "{}: two changes write {}", shown_, to);
    j.in.emplace_back("old/" + std::to_string(out(from)), to);
  }
  for (const auto& [slot, to] : news_) {
    if (!targets.insert(to).second) return Err(EINVAL, "{}: two changes write {}", shown_, to);
    j.in.emplace_back(slot, to);
  }
  for (const auto& to : targets) out(to);  // what is there now is replaced
  const std::string text = JournalText(j);
  if (auto parsed = ParseJournal(text, shown_); !parsed) {
    return Err(EINVAL, "{}", parsed.error().message());  // never: the form every open accepts
  }
  // The new content is durable before the journal names it.
  NEMOFS_RETURN_IF_ERROR(FsyncFd(new_fd_.get(), shown_ + "/" + stage_ + "/new"));
  NEMOFS_RETURN_IF_ERROR(FsyncFd(stage_fd_.get(), shown_ + "/" + stage_));
  ReplaceOptions options;
  options.temp_path = std::string(kFolderCommitJournal) + source::kCommitTempMarker.data() +
                      std::to_string(::getpid());
  options.mode = 0600;
  options.folder_sync_is_error = true;
  options.on_written = [] { MaybeCrash("folder-commit:staged"); };
  NEMOFS_RETURN_IF_ERROR(ReplaceFileAt(root_fd_, shown_, kFolderCommitJournal, options, [&](int fd) {
    return WriteFull(fd, text.data(), text.size(), shown_ + "/" + kFolderCommitJournal);
  }));
  committed_ = true;  // from here on the stage belongs to the journal
  MaybeCrash("folder-commit:journal");
  stage_fd_.Reset();
  new_fd_.Reset();
  if (Status s = Apply(root_fd_, shown_, j); !s.ok()) {
    return Err(s.error().code(), "{} (the commit is recorded in {}/{}: the next open of the checkpoint "
               "finishes it)",
               s.error().message(), shown_, kFolderCommitJournal);
  }
  return Ok();
}

Status CheckFolderCommitJournal(const std::string& text, const std::string& shown) {
  NEMOFS_ASSIGN_OR_RETURN(Journal j, ParseJournal(text, shown));
  (void)j;
  return Ok();
}

bool HasFolderCommitJournal(int root_fd) { return ExistsAt(root_fd, kFolderCommitJournal); }

Result<std::string> FinishFolderCommit(int root_fd, const std::string& shown) {
  if (!HasFolderCommitJournal(root_fd)) return std::string();
  const std::string path = shown + "/" + kFolderCommitJournal;
  UniqueFd fd(::openat(root_fd, kFolderCommitJournal, O_RDONLY | O_NOFOLLOW | O_CLOEXEC));
  if (!fd.valid()) return Err(errno, "{}: {}", path, std::strerror(errno));
  NEMOFS_ASSIGN_OR_RETURN(struct stat st, FStat(fd.get(), path));
  if (!S_ISREG(st.st_mode)) return Err(EIO, "{}: not a regular file", path);
  std::string text(static_cast<size_t>(st.st_size), '\0');
  NEMOFS_RETURN_IF_ERROR(PreadFull(fd.get(), text.data(), text.size(), 0, path));
  NEMOFS_ASSIGN_OR_RETURN(Journal j, ParseJournal(text, path));
  NEMOFS_RETURN_IF_ERROR(Apply(root_fd, shown, j));
  return fmt::format("{}: an interrupted commit was finished ({}: {} paths moved aside, {} put in "
                     "place)",
                     shown, path, j.out.size(), j.in.size());
}

}  // namespace nemofs::write
