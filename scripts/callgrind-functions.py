#!/usr/bin/env python3
"""Prints the functions of one object file that ran in callgrind profiles, most costly first.

Usage: callgrind-functions.py OBJECT_PATH_SUFFIX PROFILE...

Reads callgrind's output format (`ob=`, `fn=`, cost lines; `calls=` lines are followed by
the inclusive cost of the call, which is skipped) and sums each function's own cost over
all profiles. Names are printed as recorded (run valgrind with `--demangle=no` to get the
symbol names a linker's ordering file needs); callgrind's recursion marks (`'2`) are
dropped. The output feeds `link/symbol-order.txt` (see build.rs).
"""
import collections
import re
import sys


def functions(paths, obj):
    cost = collections.Counter()
    ref = re.compile(r"^(c?ob|c?fn|c?f[ile]|fi|fe)=\((\d+)\)(?: (.*))?$")
    for path in paths:
        tables = collections.defaultdict(dict)
        cur_ob = cur_fn = None
        skip = False
        with open(path, errors="replace") as f:
            for line in f:
                line = line.rstrip("\n")
                if skip:
                    skip = False
                    continue
                m = ref.match(line)
                if m:
                    kind, num, name = m.groups()
                    table = tables[kind.lstrip("c")]
                    if name is not None:
                        table[num] = name
                    if kind == "ob":
                        cur_ob = table.get(num)
                    elif kind == "fn":
                        cur_fn = (cur_ob, table.get(num))
                    continue
                if line.startswith("calls="):
                    skip = True
                    continue
                if cur_fn and line[:1] and (line[0].isdigit() or line[0] in "+-*"):
                    parts = line.split()
                    if len(parts) >= 2 and parts[1].isdigit():
                        cost[cur_fn] += int(parts[1])
    seen = set()
    for (ob, fn), _ in cost.most_common():
        if not ob or not fn or not ob.endswith(obj):
            continue
        name = re.sub(r"'\d+$", "", fn)
        if name not in seen:
            seen.add(name)
            yield name


def main():
    if len(sys.argv) < 3:
        sys.exit("usage: callgrind-functions.py OBJECT_PATH_SUFFIX PROFILE...")
    names = list(functions(sys.argv[2:], sys.argv[1]))
    if not names:
        sys.exit(f"no function of an object ending in {sys.argv[1]} in {' '.join(sys.argv[2:])}")
    print("\n".join(names))


if __name__ == "__main__":
    main()
