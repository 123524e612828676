// Who may do what with a node of the tree (DESIGN.md §2): owners, groups and
// permission bits come from the source, so that with `allow_other` and the
// kernel's `default_permissions` nobody reads through the mount what they
// could not read in the source.
//
// - Folder sources: each file's and directory's own stat.
// - Archives and single files: the archive file's owner and group (uid
//   numbers inside a downloaded tar name users of another machine), and the
//   member's mode limited to the archive file's mode.
// - Synthesized nodes (tensors/, index.json, model.safetensors, ...): the
//   intersection (Combine) of the files their bytes come from.
// Write bits are kept apart (Node::write_perm) and shown only where the tree
// can write.
#pragma once

#include <cstdint>

namespace nemofs::tree {

struct Access {
  uint32_t uid = 0;
  uint32_t gid = 0;
  uint32_t mode = 0;  // rwx bits for owner, group, other (no type, no setuid)
};

// Rights that hold for both `a` and `b`, expressed with a's owner and group:
// a class gets a bit only if everyone in it has that bit on both files. When
// owners or groups differ, a's owner (or group) is judged by b's "other"
// (and group) bits, which never grants more than b does.
inline Access Combine(const Access& a, const Access& b) {
  uint32_t bu = (b.mode >> 6) & 7, bg = (b.mode >> 3) & 7, bo = b.mode & 7;
  uint32_t owner = a.uid == b.uid ? bu : (bg & bo);
  uint32_t group = a.gid == b.gid ? bg : bo;
  uint32_t mask = (owner << 6) | (group << 3) | bo;
  return Access{a.uid, a.gid, a.mode & mask & 0777};
}

// A directory may be searched by whoever may read it.
inline uint32_t DirMode(uint32_t mode) {
  uint32_t r = mode & 0444;
  return (mode & 0777) | (r >> 2);
}

}  // namespace nemofs::tree
