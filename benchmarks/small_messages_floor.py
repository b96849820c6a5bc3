"""What the kernel lets a small-message receiver on a socket pair reach.

A ``bigipc.Pipe()`` is an ``AF_UNIX`` stream socket pair, and a message on a
stream has to be read with two calls: its header, then exactly its payload
(reading more would take bytes of the next message out of the socket, where
``wait()`` and other readers of the same connection can no longer see them).
This script measures that floor in C (it needs a C compiler, ``$CC`` or
``cc``), next to what the two ways past it would give: a ``SOCK_SEQPACKET``
pair, where the kernel keeps message boundaries and one call reads a whole
message, and a stream read ahead in 64 KiB blocks. Interleaved with those
run ``multiprocessing.Pipe()``, ``bigipc.Pipe()`` one by one, and
``bigipc.Pipe()`` taken with ``recv_many`` (bigipc's read-ahead, within the
batch it returns). A forked producer sends 100-byte messages with a 4-byte
length prefix (one ``send`` each); the consumer's CPU time per message is
what limits the rate. Linux; it uses fork::

    python benchmarks/small_messages_floor.py --count 300000 --rounds 5
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import subprocess
import tempfile
from typing import Any

from _forked import timed_transfer

import bigipc

_PAYLOAD = bytes(range(100))

# The floor, in C: a forked producer sends `count` frames of a 4-byte length
# and 100 bytes, one send() each, over an AF_UNIX pair of the given type with
# 4 MiB buffers; the consumer reads them back (stream: the length, then
# exactly the payload; seqpacket: one recv() per frame) and prints messages
# per second and its CPU microseconds per message.
_C_SOURCE = r"""
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

enum { STREAM, SEQPACKET, READ_AHEAD };

int main(int argc, char **argv) {
    int mode = atoi(argv[1]), size = 4 << 20, sv[2], status = 0;
    long count = atol(argv[2]);
    char frame[104], buf[65536], message[65536];
    size_t have = 0, at = 0;
    uint32_t length = 100;
    struct timespec t0, t1;
    struct rusage ru;
    if (socketpair(AF_UNIX, mode == SEQPACKET ? SOCK_SEQPACKET : SOCK_STREAM, 0, sv)) return 2;
    for (int i = 0; i < 2; i++) {
        setsockopt(sv[i], SOL_SOCKET, SO_SNDBUF, &size, sizeof size);
        setsockopt(sv[i], SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
    }
    memcpy(frame, &length, 4);
    memset(frame + 4, 7, 100);
    if (fork() == 0) {
        close(sv[0]);
        for (long i = 0; i < count; i++)
            if (send(sv[1], frame, sizeof frame, 0) != sizeof frame) _exit(1);
        _exit(0);
    }
    close(sv[1]);
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (long i = 0; i < count; i++) {
        if (mode == SEQPACKET) {
            if (recv(sv[0], buf, sizeof buf, 0) != sizeof frame) return 3;
        } else if (mode == STREAM) {
            if (recv(sv[0], &length, 4, MSG_WAITALL) != 4) return 3;
            if (recv(sv[0], buf, length, MSG_WAITALL) != (ssize_t)length) return 3;
        } else {
            /* Read as much as is there, hand out one frame at a time. */
            for (;;) {
                if (have - at >= 4) {
                    memcpy(&length, buf + at, 4);
                    if (have - at >= 4 + (size_t)length) break;
                }
                memmove(buf, buf + at, have - at);
                have -= at;
                at = 0;
                ssize_t n = recv(sv[0], buf + have, sizeof buf - have, 0);
                if (n <= 0) return 3;
                have += (size_t)n;
            }
            memcpy(message, buf + at + 4, length);
            at += 4 + (size_t)length;
            if (length != 100 || message[0] != 7) return 4; /* the frames parse as sent */
        }
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    getrusage(RUSAGE_SELF, &ru);
    wait(&status);
    printf("%f %f\n", count / ((t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9),
           (ru.ru_utime.tv_sec + ru.ru_stime.tv_sec
            + (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6) / count * 1e6);
    return status != 0;
}
"""


def _build_floor(directory: str) -> str:
    source = os.path.join(directory, "floor.c")
    program = os.path.join(directory, "floor")
    with open(source, "w") as f:
        f.write(_C_SOURCE)
    subprocess.run([os.environ.get("CC", "cc"), "-O2", "-o", program, source], check=True)
    return program


_C_MODES = {"stream": "0", "seqpacket": "1", "read-ahead": "2"}


def _run_floor(program: str, kind: str, count: int) -> tuple[float, float]:
    flag = _C_MODES[kind]
    out = subprocess.run([program, flag, str(count)], check=True, capture_output=True, text=True)
    rate, cpu = out.stdout.split()
    return float(rate), float(cpu)


def measure(kind: str, count: int) -> tuple[float, float]:
    """(messages per second, consumer CPU microseconds per message)."""
    lib: Any = multiprocessing if kind == "multiprocessing" else bigipc
    ours, theirs = lib.Pipe()
    elapsed, cpu = timed_transfer(ours, theirs, _PAYLOAD, count, batches=kind == "bigipc-batches")
    return count / elapsed, cpu / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=300000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    kinds = ["multiprocessing", "bigipc", "bigipc-batches", "stream", "seqpacket", "read-ahead"]
    names = {
        "multiprocessing": "multiprocessing.Pipe()",
        "bigipc": "bigipc.Pipe()",
        "bigipc-batches": "bigipc.Pipe(), recv_many",
        "stream": "C, stream pair, 2 recv calls",
        "seqpacket": "C, seqpacket pair, 1 recv call",
        "read-ahead": "C, stream pair, read-ahead",
    }
    runs: dict[str, list[tuple[float, float]]] = {k: [] for k in kinds}
    with tempfile.TemporaryDirectory() as directory:
        program = _build_floor(directory)
        for _ in range(args.rounds):
            for kind in kinds:
                if kind in _C_MODES:
                    runs[kind].append(_run_floor(program, kind, args.count))
                else:
                    runs[kind].append(measure(kind, args.count))
    base = statistics.median(r[0] for r in runs["multiprocessing"])
    print("100-byte messages, median of %d rounds of %d" % (args.rounds, args.count))
    for kind in kinds:
        rate = statistics.median(r[0] for r in runs[kind])
        cpu = statistics.median(r[1] for r in runs[kind])
        print(
            "%-30s %6.0fk msg/s  %.2fx mp  consumer %.2f us/msg" % (names[kind], rate / 1e3, rate / base, cpu)
        )


if __name__ == "__main__":
    main()
