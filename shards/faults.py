"""Fault injection at write boundaries, for the crash-consistency test.

Why it exists: a kill at a random wall-clock time mostly lands in imports or Ray's start-up and
proves little. :class:`shards.urls.Location` calls :func:`boundary` right after each change it
makes to storage, so a test can number every such point of a command and kill the command at
exactly the Nth one, the state a power cut there would leave.

A *write boundary* is the instant after one of these steps (on a local disk):

* ``temp``: a temporary is written and fsynced, not yet renamed or linked into place;
* ``rename``: ``write_atomic``'s rename made the file visible under its final name;
* ``link``: ``create_exclusive``'s link made it visible (its temporary is still there);
* ``drop-temp``: ``create_exclusive`` removed its temporary;
* ``put``: one whole-object PUT on an object store (there is no "before" state apart from the
  previous boundary's);
* ``remove``: a file or folder was removed (stale temporaries, resume bookkeeping, old checkpoints).

Environment (all unset in normal use: then :func:`boundary` costs one dict lookup):

``ONION_FAULT_COUNTER=FILE``
    every boundary appends ``<pid> <kind> <path>`` as one line to FILE, under an exclusive
    ``flock``, so the driver, its Ray workers and actors (which inherit the environment) share one
    numbering: line N is boundary N. With this alone, a run only counts.
``ONION_FAULT_AT=N``
    at boundary N the process SIGKILLs every process of its session, itself last, while still
    holding the lock: the command, its embedded Ray and all Ray's workers (each in a process group
    of its own, so killing the command's group would miss them) die at once, no other process passes
    another boundary, and Ray gets no chance to retry the task. Start the command in a session of
    its own (``setsid``, ``start_new_session=True``). In a terminal's session (one with a
    controlling terminal, which holds the shell) only the caller's process group is killed.
``ONION_FAULT_MATCH=TEXT``
    only boundaries whose line (``<pid> <kind> <path>``) contains TEXT are numbered: ``ONION_FAULT_AT=1``
    with ``ONION_FAULT_MATCH="rename /run/metrics.csv"`` is "right after the first metrics row".
``ONION_FAULT_SIGNAL=INT``
    at boundary N, press Ctrl-C instead of cutting the power: SIGINT to the session leader's process
    group, the group a terminal would signal (the caller's own group in a terminal's session). The
    Ctrl-C test uses it so the interruption lands at a chosen point of a job that is under way,
    whatever the machine's load, instead of at a wall-clock time the job may already have passed.
    ``ONION_FAULT_SIGNAL=STOP`` pauses the process that reached boundary N (SIGSTOP to itself, once
    the lock is released) until someone sends it SIGCONT: the twin-ingest test lets another job run
    to its end in that pause. ``ONION_FAULT_SIGNAL=DIE`` kills only the process that reached boundary N
    (SIGKILL to itself, once the lock is released): one worker lost, the others left running (the Ray
    Train test kills a training worker so).
"""
from __future__ import annotations

import fcntl
import os
import signal

COUNTER = "ONION_FAULT_COUNTER"
FAULT_AT = "ONION_FAULT_AT"
MATCH = "ONION_FAULT_MATCH"
SIGNAL = "ONION_FAULT_SIGNAL"


def boundary(kind: str, path: str) -> None:
    """A write boundary was just passed: count it, and die here if it is the chosen one."""
    counter = os.environ.get(COUNTER)
    if counter:
        _reached(counter, kind, path)


def _reached(counter: str, kind: str, path: str) -> None:
    fd = os.open(counter, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    pause = die = False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        match = os.environ.get(MATCH, "").encode()  # b"" is in every line: then every boundary counts
        line = f"{os.getpid()} {kind} {path}\n".encode()
        seen = sum(match in earlier for earlier in _read_all(fd).splitlines())
        os.write(fd, line)
        if match in line and seen + 1 == int(os.environ.get(FAULT_AT) or 0):
            chosen = os.environ.get(SIGNAL, "KILL").upper().removeprefix("SIG")
            if chosen == "INT":
                _ctrl_c()
            elif chosen == "STOP":
                pause = True
            elif chosen == "DIE":
                die = True
            else:
                _power_cut()
    finally:
        os.close(fd)
    if pause:
        os.kill(os.getpid(), signal.SIGSTOP)
    if die:
        os.kill(os.getpid(), signal.SIGKILL)


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def _in_terminal_session() -> bool:
    """True in a terminal's session (or without /proc to tell): signal only the caller's own group."""
    return not os.path.isdir("/proc") or _stat(os.getpid())[4] != "0"


def _ctrl_c() -> None:
    os.killpg(os.getpgid(0) if _in_terminal_session() else os.getsid(0), signal.SIGINT)


def _power_cut() -> None:
    if _in_terminal_session():
        os.killpg(os.getpgid(0), signal.SIGKILL)
    kill_session(os.getsid(0))
    os.kill(os.getpid(), signal.SIGKILL)


def kill_session(session: int) -> None:
    """SIGKILL every live process of ``session`` but the caller, again until none is left (the
    raylet may start a worker meanwhile). Linux (/proc); elsewhere the session leader's group."""
    if not os.path.isdir("/proc"):
        try:
            os.killpg(session, signal.SIGKILL)
        except OSError:
            pass
        return
    for _ in range(200):
        alive = [pid for pid in _members(session) if pid != os.getpid()]
        if not alive:
            return
        for pid in alive:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def _members(session: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields and fields[3] == str(session) and fields[0] not in "ZX":  # zombies are dead already
                members.append(int(entry))
    return members


def _stat(pid: int) -> list[str]:
    """/proc/PID/stat after the command name: state, ppid, pgrp, session, tty_nr, ... ([] if gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return handle.read().rsplit(b")", 1)[1].decode().split()
    except (OSError, IndexError):
        return []


def read_boundaries(counter: str) -> list[tuple[int, str, str]]:
    """The boundaries a counted run passed, in order: ``(pid, kind, path)``."""
    if not os.path.exists(counter):
        return []
    with open(counter) as handle:
        return [(int(pid), kind, path) for pid, kind, path in (line.rstrip("\n").split(" ", 2) for line in handle)]
