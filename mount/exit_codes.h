// Exit codes of the nemofs command: part of its interface (README "Exit codes").
#pragma once

namespace nemofs::mountcmd {

inline constexpr int kExitOk = 0;
inline constexpr int kExitFailure = 1;  // the command ran and failed (path not in tree, busy...)
inline constexpr int kExitUsage = 2;    // bad command line
inline constexpr int kExitSource = 3;   // the source cannot be opened or is not a valid checkpoint
inline constexpr int kExitMount = 4;    // the mount point is unusable or FUSE failed

}  // namespace nemofs::mountcmd
