"""The cross-encoder score pickle ({qid: {pid: score}}, ~160M scores): a restricted, streaming unpickler.

pickle.load would build the whole dict (>25 GB of Python objects) and runs whatever code the file names. This reader
executes only the opcodes of built-in containers, strings and numbers, refuses any opcode that imports or calls (but
for the few names below, which it decodes itself), and hands each inner dict to a callback, so peak memory stays at
one query.

A dict filled straight from CrossEncoder.predict holds numpy scalars (numpy ids too, when they came from an array),
and is often a defaultdict: the few globals those pickle as (numpy scalar, numpy.dtype, collections.defaultdict with
a builtin factory, and _codecs.encode for bytes at protocol 2) are admitted by name and decoded here; nothing is
imported or called."""
from __future__ import annotations

import gzip
import struct
import sys
import typing
from pathlib import Path
from typing import Callable

from .errors import DataError
from .formats import zlib_error


_SCALAR = {"numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar"}  # numpy 1 / numpy 2
_FACTORIES = {"builtins.dict", "builtins.float", "builtins.int", "builtins.list"}  # defaultdict factories admitted
_ADMITTED = _SCALAR | _FACTORIES | {"numpy.dtype", "collections.defaultdict", "_codecs.encode"}
_PROTOCOL2_NAMES = {f"__builtin__.{n}": f"builtins.{n}" for n in ("dict", "float", "list")}  # Python 2 names
_PROTOCOL2_NAMES["__builtin__.long"] = "builtins.int"
_DTYPES = {"f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8"}  # numpy scalars read: floats and ints
_FLOAT = {2: "e", 4: "f", 8: "d"}  # struct codes of float16/32/64
_MAX_ITEM = 1 << 26  # bytes: no string or bytes item of a score pickle comes near 64 MiB; a longer length is damage


class _Global:
    """A global the pickle names and this reader admits: a name only, nothing is imported."""
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name


class _Dtype:
    """A pickled numpy.dtype: its code ('f4') and, once BUILD has run, its byte order."""
    __slots__ = ("code", "order")

    def __init__(self, code: str):
        self.code, self.order = code, "="


def _scalar_value(dt: _Dtype, raw: bytes) -> int | float:
    """The value of a numpy scalar from its dtype and raw bytes, as numpy.frombuffer would read it."""
    size = int(dt.code[1:])
    if len(raw) != size:
        raise ValueError(f"numpy scalar of dtype {dt.code} has {len(raw)} bytes")
    big = dt.order == ">" or (dt.order == "=" and sys.byteorder == "big")
    if dt.code[0] == "f":
        return struct.unpack((">" if big else "<") + _FLOAT[size], raw)[0]
    return int.from_bytes(raw, "big" if big else "little", signed=dt.code[0] == "i")


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
        if not 0 <= n <= _MAX_ITEM:  # a corrupt length: negative would step back onto the opcode and loop forever
            raise DataError(f"{self.path}: an item of {n:,} bytes at byte {self.pos:,} of the stream; the file is "
                            "corrupt: delete it and download it again")
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
    memo_of: dict = {}  # id(str / bytes / tuple) -> memo index, to drop a numpy scalar's parts once it is decoded
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

    def put(idx: int) -> None:
        """Memoise the top of the stack, except what nothing refers back to (an inner score dict, a decoded
        number: pickle memoises neither int nor float, so one came from a numpy scalar)."""
        obj = stack[-1]
        if not isinstance(obj, (_Scores, int, float)):
            memo[idx] = obj
            if isinstance(obj, (str, bytes, tuple)):
                memo_of[id(obj)] = idx

    def get(idx: int):
        if idx not in memo:
            raise DataError(f"{path}: the pickle refers back (memo entry {idx}) to an object this streaming reader "
                            "does not keep (an inner dict or a numpy scalar stored twice) or never saw")
        return memo[idx]

    def forget(*objs) -> None:
        """Drop memo entries of a numpy scalar's parts (bytes, argument tuples) once used: ~5 per score would
        otherwise pile up over 160M scores. One-byte bytes and one-char strings are CPython singletons that the
        pickle refers back to, so they stay."""
        for obj in objs:
            if not (isinstance(obj, (str, bytes)) and len(obj) <= 1):
                memo.pop(memo_of.pop(id(obj), None), None)

    def refuse(op: bytes, what: str = ""):
        raise DataError(
            f"{path}: refusing to unpickle: opcode {op!r}{what} at byte ~{s.pos} is not one of built-in "
            f"containers, numbers, numpy scalars and defaultdicts (it could import or call code, e.g. GLOBAL/REDUCE). "
            f"Only a {{qid: {{pid: score}}}} of ints and floats (or numpy ones) is accepted; check where this file "
            f"came from")

    def new_dict():
        """An empty dict ({} or a defaultdict): the root, the inner dict of the qid below it, or a plain dict."""
        nonlocal root
        if root is None:
            root = {}
            return root
        if marks and len(stack) >= 2 and stack[marks[-1] - 1] is root and type(stack[-1]) is int:
            return _Scores(stack[-1])
        if not marks and len(stack) >= 2 and stack[-2] is root and type(stack[-1]) is int:
            return _Scores(stack[-1])  # protocol 0/1 style SETITEM per key
        return {}

    def call(op: bytes, fn, args):
        """REDUCE of an admitted global, decoded without calling it; anything else is refused."""
        name = fn.name if isinstance(fn, _Global) else type(fn).__name__
        if type(args) is not tuple:
            refuse(op, f" (calling {name})")
        if name in _SCALAR and len(args) == 2 and isinstance(args[0], _Dtype) and type(args[1]) is bytes:
            forget(args, args[1])
            return _scalar_value(*args)
        if name == "numpy.dtype" and len(args) == 3 and type(args[0]) is str:
            if args[0] not in _DTYPES:
                raise DataError(f"{path}: holds a numpy scalar of dtype {args[0]!r}; expected int ids and float "
                                "(or int) scores")
            return _Dtype(args[0])
        if name == "_codecs.encode" and len(args) == 2 and type(args[0]) is str and args[1] == "latin1":
            forget(args, args[0])
            return args[0].encode("latin-1")  # how protocol 2 writes bytes
        if (name == "collections.defaultdict" and len(args) == 1
                and (args[0] is None or isinstance(args[0], _Global) and args[0].name in _FACTORIES)):
            forget(args)
            return new_dict()
        refuse(op, f" (calling {name})")

    def admit(op: bytes, module: str, name: str) -> _Global:
        full = _PROTOCOL2_NAMES.get(f"{module}.{name}", f"{module}.{name}")
        if full not in _ADMITTED:
            refuse(op, f" (naming {module}.{name})")
        return _Global(full)

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
        while True:  # the most frequent opcodes first: ids and scores, then a numpy scalar's (get, put, bytes, call)
            if s.pos >= len(s.buf):
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
            elif op == b"h":
                stack.append(get(s.take(1)[0]))
            elif op in (b"\x94", b"q", b"r"):
                idx = memo_next if op == b"\x94" else s.take(1)[0] if op == b"q" else unpack_i(s.take(4))[0]
                memo_next = max(memo_next, idx + 1)
                put(idx)
            elif op == b"C":
                stack.append(s.take(s.take(1)[0]))
            elif op in (b"\x85", b"\x86", b"\x87"):
                n = op[0] - 0x84
                items = tuple(stack[-n:])
                del stack[-n:]
                stack.append(items)
            elif op == b"R":
                args = stack.pop()
                stack.append(call(op, stack.pop(), args))
            elif op == b"X":
                stack.append(s.take(unpack_i(s.take(4))[0]).decode("utf-8"))
            elif op == b"V":  # protocol 0's text (a numpy scalar's dtype code and bytes)
                stack.append(s.line().decode("raw_unicode_escape"))
            elif op == b"u":
                k = marks.pop()
                items = stack[k:]
                del stack[k:]
                add_items(stack[-1], items)
            elif op == b"(":
                marks.append(len(stack))
            elif op == b"}":
                stack.append(new_dict())
            elif op == b"j":
                stack.append(get(unpack_i(s.take(4))[0]))
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
                put(int(s.line()))
            elif op == b"g":
                stack.append(get(int(s.line())))
            elif op == b"N":
                stack.append(None)
            elif op in (b"\x88", b"\x89"):
                stack.append(op == b"\x88")
            elif op == b"\x8c":
                stack.append(s.take(s.take(1)[0]).decode("utf-8"))
            elif op == b"\x8d":
                stack.append(s.take(struct.unpack("<Q", s.take(8))[0]).decode("utf-8"))
            elif op == b"B":
                stack.append(s.take(unpack_i(s.take(4))[0]))
            elif op == b"\x8e":
                stack.append(s.take(struct.unpack("<Q", s.take(8))[0]))
            elif op == b"c":
                module = s.line().decode("utf-8")
                stack.append(admit(op, module, s.line().decode("utf-8")))
            elif op == b"\x93":
                name, module = stack.pop(), stack.pop()
                if type(name) is not str or type(module) is not str:
                    refuse(op)
                stack.append(admit(op, module, name))
            elif op == b"b":
                state = stack.pop()
                if not isinstance(stack[-1], _Dtype):
                    refuse(op, f" (setting the state of a {type(stack[-1]).__name__})")
                if (type(state) is not tuple or len(state) < 5 or state[1] not in ("<", ">", "|", "=")
                        or state[2:5] != (None, None, None)):
                    raise DataError(f"{path}: holds a numpy dtype with fields or subarrays ({state!r}); expected "
                                    "int ids and float scores")
                stack[-1].order = state[1]
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
                # protocols 0 and 1 open every dict as MARK DICT with no items (SETITEM fills it): the root, or a
                # query's scores, must then be recognised as such
                stack.append(dict(zip(items[::2], items[1::2])) if items else new_dict())
            elif op == b"l":
                k = marks.pop()
                items = stack[k:]
                del stack[k:]
                stack.append(items)
            else:
                refuse(op)
    except (IndexError, KeyError, struct.error, ValueError, UnicodeDecodeError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path}: not a well-formed pickle of {{qid: {{pid: score}}}} ({type(e).__name__}: {e})") from e
    finally:
        f.close()
    if root is None or len(stack) != 1 or stack[0] is not root:
        raise DataError(f"{path}: the pickle does not hold a dict {{qid: {{pid: score}}}}")
    return n_queries
