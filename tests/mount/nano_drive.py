# Drives GNU nano through a pseudo-terminal, as a person would: open FILE,
# type TEXT as a new first line, ^O Enter (write out), ^X (exit; answering
# "no" to saving if the write failed). Each key is sent once nano shows the
# screen it answers (no fixed sleeps). Prints what nano showed, then STATUS.
# Usage: nano_drive.py FILE TEXT
import os
import pty
import select
import sys
import time

path, text = sys.argv[1], sys.argv[2]
pid, fd = pty.fork()
if pid == 0:
    os.environ['TERM'] = 'xterm'
    os.execvp('nano', ['nano', '--ignorercfiles', path])

screen = b''


def expect(*patterns, timeout=20.0):
    """Reads nano's output until one of `patterns` shows up; returns it
    (None when nano closed the terminal first)."""
    global screen
    end = time.time() + timeout
    while time.time() < end:
        for p in patterns:
            if p in screen:
                screen = screen[screen.index(p) + len(p):]
                return p
        r, _, _ = select.select([fd], [], [], 0.05)
        if r:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                return None
            if not chunk:
                return None
            sys.stdout.write(chunk.decode(errors='replace'))
            screen += chunk
    sys.exit('nano_drive: timed out waiting for %r' % (patterns,))


def expect_or_die(*patterns):
    if expect(*patterns) is None:
        sys.exit('nano_drive: nano exited before showing %r' % (patterns,))


expect_or_die(b'Help')             # the editor is up
os.write(fd, text.encode() + b'\r')  # typed at the top of the buffer
expect_or_die(b'Modified')
os.write(fd, b'\x0f')              # ^O
expect_or_die(b'File Name to Write')
os.write(fd, b'\r')
expect_or_die(b'Wrote', b'Error writing')
os.write(fd, b'\x18')              # ^X
if expect(b'Save modified buffer') is not None:
    os.write(fd, b'n')
_, status = os.waitpid(pid, 0)
print('\nSTATUS', status)
