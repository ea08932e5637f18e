"""The cross-encoder score pickle ({qid: {pid: score}}, ~160M scores): a restricted, streaming unpickler.

pickle.load would build the whole dict (>25 GB of Python objects) and runs whatever code the file names. This reader
executes only the opcodes of built-in containers, strings and numbers, refuses any opcode that imports or calls, and
hands each inner dict to a callback, so peak memory stays at one query."""
from __future__ import annotations

import gzip
import struct
import typing
from pathlib import Path
from typing import Callable

from .errors import DataError
from .formats import zlib_error


class _Scores:
    """Stands for one inner {pid: score} dict: its items go to the writer, not into Python objects."""
    __slots__ = ("qid", "pids", "scores")

    def __init__(self, qid: int):
        self.qid, self.pids, self.scores = qid, [], []


class _PickleStream:
    def __init__(self, f: typing.BinaryIO, path: Path):
        self.f, self.path, self.buf, self.pos = f, path, b"", 0

    def need(self, n: int) -> None:
        if self.pos + n > len(self.buf):
            try:
                more = self.f.read(max(n, 1 << 22))
            except (EOFError, OSError, zlib_error()) as e:
                raise DataError(f"{self.path}: the compressed stream breaks off ({e}); the file is truncated "
                                "or corrupt: delete it and download it again") from e
            self.buf = self.buf[self.pos:] + more
            self.pos = 0
            if len(self.buf) < n:
                raise DataError(f"{self.path}: the pickle ends early; the file is truncated: delete it and "
                                "download it again")

    def take(self, n: int) -> bytes:
        self.need(n)
        b = self.buf[self.pos:self.pos + n]
        self.pos += n
        return b

    def line(self) -> bytes:
        out = b""
        while True:
            self.need(1)
            i = self.buf.find(b"\n", self.pos)
            if i >= 0:
                out += self.buf[self.pos:i]
                self.pos = i + 1
                return out
            out += self.buf[self.pos:]
            self.pos = len(self.buf)


def stream_score_pickle(path: Path, emit: Callable[[int, list, list], None]) -> int:
    """Run the restricted unpickler over a (gzipped) pickle of {qid: {pid: score}}; call emit(qid, pids, scores)
    once per query. Returns the number of queries. Anything but that shape, or any opcode that could run code,
    is a DataError."""
    f = gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")
    s = _PickleStream(f, path)
    stack: list = []
    marks: list[int] = []
    memo: dict = {}  # inner score dicts are not kept here: nothing in {qid: {pid: score}} refers back to one
    memo_next = 0
    root = None
    n_queries = 0
    unpack_i, unpack_d = struct.Struct("<i").unpack, struct.Struct(">d").unpack

    def finish(obj) -> None:
        nonlocal n_queries
        if isinstance(obj, _Scores) and obj.pids is not None:
            emit(obj.qid, obj.pids, obj.scores)
            obj.pids = obj.scores = None  # the memo keeps the object: drop its data
            n_queries += 1

    def add_items(target, items: list) -> None:
        if isinstance(target, _Scores):
            for k, v in zip(items[::2], items[1::2]):
                if type(k) is not int or type(v) not in (float, int):
                    raise DataError(f"{path}: inner dict of qid {target.qid} maps {k!r} to {v!r}; expected "
                                    "int pid -> float score")
                target.pids.append(k)
                target.scores.append(v)
        elif target is root:
            for k, v in zip(items[::2], items[1::2]):
                if not isinstance(v, _Scores) or v.qid != k:
                    raise DataError(f"{path}: top-level key {k!r} maps to {type(v).__name__}; expected "
                                    "{qid: {pid: score}}")
                finish(v)
        elif isinstance(target, dict):
            target.update(zip(items[::2], items[1::2]))
        else:
            raise DataError(f"{path}: SETITEMS on a {type(target).__name__}; not a pickled dict")

    try:
        while True:
            s.need(1)
            op = s.buf[s.pos:s.pos + 1]
            s.pos += 1
            if op == b"J":
                stack.append(unpack_i(s.take(4))[0])
            elif op == b"G":
                stack.append(unpack_d(s.take(8))[0])
            elif op == b"K":
                stack.append(s.take(1)[0])
            elif op == b"M":
                stack.append(int.from_bytes(s.take(2), "little"))
            elif op == b"u":
                k = marks.pop()
                items = stack[k:]
                del stack[k:]
                add_items(stack[-1], items)
            elif op == b"(":
                marks.append(len(stack))
            elif op == b"}":
                if root is None:
                    root = {}
                    stack.append(root)
                elif marks and len(stack) >= 2 and stack[marks[-1] - 1] is root and type(stack[-1]) is int:
                    stack.append(_Scores(stack[-1]))
                elif not marks and len(stack) >= 2 and stack[-2] is root and type(stack[-1]) is int:
                    stack.append(_Scores(stack[-1]))  # protocol 0/1 style SETITEM per key
                else:
                    stack.append({})
            elif op in (b"\x94", b"q", b"r"):
                idx = memo_next if op == b"\x94" else s.take(1)[0] if op == b"q" else unpack_i(s.take(4))[0]
                memo_next = max(memo_next, idx + 1)
                if not isinstance(stack[-1], _Scores):
                    memo[idx] = stack[-1]
            elif op == b"h":
                stack.append(memo[s.take(1)[0]])
            elif op == b"j":
                stack.append(memo[unpack_i(s.take(4))[0]])
            elif op == b"s":
                v = stack.pop()
                k = stack.pop()
                add_items(stack[-1], [k, v])
            elif op == b"\x80":
                s.take(1)
            elif op == b"\x95":
                s.take(8)
            elif op == b".":
                break
            elif op == b"\x8a":
                n = s.take(1)[0]
                stack.append(int.from_bytes(s.take(n), "little", signed=True))
            elif op == b"\x8b":
                n = unpack_i(s.take(4))[0]
                stack.append(int.from_bytes(s.take(n), "little", signed=True))
            elif op in (b"I", b"L"):
                text = s.line().rstrip(b"L")
                stack.append(True if text == b"01" else False if text == b"00" else int(text))
            elif op == b"F":
                stack.append(float(s.line()))
            elif op == b"p":
                if not isinstance(stack[-1], _Scores):
                    memo[int(s.line())] = stack[-1]
            elif op == b"g":
                stack.append(memo[int(s.line())])
            elif op == b"N":
                stack.append(None)
            elif op in (b"\x88", b"\x89"):
                stack.append(op == b"\x88")
            elif op == b"\x8c":
                stack.append(s.take(s.take(1)[0]).decode("utf-8"))
            elif op == b"X":
                stack.append(s.take(unpack_i(s.take(4))[0]).decode("utf-8"))
            elif op == b"\x8d":
                stack.append(s.take(struct.unpack("<Q", s.take(8))[0]).decode("utf-8"))
            elif op == b"]":
                stack.append([])
            elif op == b")":
                stack.append(())
            elif op == b"a":
                v = stack.pop()
                stack[-1].append(v)
            elif op == b"e":
                k = marks.pop()
                items = stack[k:]
                del stack[k:]
                stack[-1].extend(items)
            elif op == b"t":
                k = marks.pop()
                items = tuple(stack[k:])
                del stack[k:]
                stack.append(items)
            elif op in (b"\x85", b"\x86", b"\x87"):
                n = op[0] - 0x84
                items = tuple(stack[-n:])
                del stack[-n:]
                stack.append(items)
            elif op == b"0":
                stack.pop()
            elif op == b"1":
                del stack[marks.pop():]
            elif op == b"2":
                stack.append(stack[-1])
            elif op == b"d":
                k = marks.pop()
                items = stack[k:]
                del stack[k:]
                stack.append(dict(zip(items[::2], items[1::2])))
            elif op == b"l":
                k = marks.pop()
                items = stack[k:]
                del stack[k:]
                stack.append(items)
            else:
                raise DataError(
                    f"{path}: refusing to unpickle: opcode {op!r} at byte ~{s.pos} is not one of built-in "
                    f"containers and numbers (it could import or call code, e.g. GLOBAL/REDUCE). Only a plain "
                    f"{{qid: {{pid: score}}}} of ints and floats is accepted; check where this file came from")
    except (IndexError, KeyError, struct.error, ValueError, UnicodeDecodeError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path}: not a well-formed pickle of {{qid: {{pid: score}}}} ({type(e).__name__}: {e})") from e
    finally:
        f.close()
    if root is None or len(stack) != 1 or stack[0] is not root:
        raise DataError(f"{path}: the pickle does not hold a dict {{qid: {{pid: score}}}}")
    return n_queries
