#!/usr/bin/python3
"""Differential test of nemofs's config validator against NeMo's loader.

nemofs must accept a config written through the mount exactly when
OmegaConf.load (Debian python3-omegaconf, run with /usr/bin/python3) loads it
and its top level is a non-empty mapping (a DictConfig with >= 1 key).

This script builds a deterministic corpus of one-edit mutations of REAL
configs (the config YAMLs inside tests/data/*.nemo and tests/data/nemo2_*
folders, plus ../shared/real-fixtures when present), asks the oracle
(OmegaConf.load on each file) and the validator (yaml_check_cli, which calls
the ValidateConfigYaml the mount uses, on all files in one process) and
prints every disagreement. Exit status: 0 none, 1 some, 2 setup error.

  yaml_corpus.py --cli build/tests/yaml_check_cli [--cases N] [--seed S]
  yaml_corpus.py --emit DIR --sample N     (for the mount test: DIR/NNNN.yaml
                                           and DIR/manifest.tsv "id<TAB>accept<TAB>mutation")
"""
import argparse
import multiprocessing
import os
import random
import subprocess
import sys
import tarfile
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "data")
REAL = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "real-fixtures"))


# ---- the real configs ------------------------------------------------------

def _tar_config(path):
    with tarfile.open(path) as t:
        for m in t.getmembers():
            if m.isfile() and os.path.basename(m.name) == "model_config.yaml":
                return t.extractfile(m).read()
    return None


def real_configs(real_dir):
    """(name, bytes) of every real config found, deduplicated by content."""
    found = []
    for d, real in ((DATA, False), (real_dir, True)):
        if not d or not os.path.isdir(d):
            continue
        for root, dirs, files in os.walk(d):
            dirs.sort()
            for f in sorted(files):
                p = os.path.join(root, f)
                rel = os.path.relpath(p, d)
                if f.endswith(".nemo"):
                    try:
                        text = _tar_config(p)
                    except (tarfile.TarError, OSError):
                        text = None
                    if text is not None:
                        found.append((("real/" if real else "") + rel, text))
                elif f.endswith(".yaml") and (real or rel.startswith("nemo2_")):
                    with open(p, "rb") as fh:
                        found.append((("real/" if real else "") + rel, fh.read()))
    seen, out = set(), []
    for name, text in found:
        if text not in seen:
            seen.add(text)
            out.append((name, text))
    return out


# ---- mutations -------------------------------------------------------------
# Each takes (rng, text: bytes) and returns (description, new bytes): one edit.

def _lines(text):
    return text.split(b"\n")


def _pos(rng, text):
    """A position: any byte, a line start, after the indentation, after
    'key:', or a line end."""
    how = rng.randrange(5)
    if how == 0 or not text:
        return rng.randrange(len(text) + 1)
    starts = [0] + [i + 1 for i, c in enumerate(text) if c == 0x0A and i + 1 <= len(text)]
    s = rng.choice(starts)
    if how == 1:
        return s
    e = text.find(b"\n", s)
    e = len(text) if e < 0 else e
    if how == 2:
        while s < e and text[s] == 0x20:
            s += 1
        return s
    if how == 3:
        c = text.find(b":", s, e)
        return e if c < 0 else c + 1 + (1 if c + 1 < e and text[c + 1] == 0x20 else 0)
    return e


def _ins(text, at, s):
    return text[:at] + s + text[at:]


def m_cut(rng, text):
    k = rng.randrange(len(text) + 1)
    return "cut at byte %d" % k, text[:k]


CHARS = [b'"', b"'", b"[", b"]", b"{", b"}", b"\t", b":", b"#", b"&", b"*", b"|", b">",
         b"!", b"%", b"@", b"`", b",", b"?", b"-", b" ", b"\\", b"\n", b"\r"]


def m_char(rng, text):
    c = rng.choice(CHARS)
    at = _pos(rng, text)
    return "insert %r at %d" % (c.decode(), at), _ins(text, at, c)


TOKENS = [b"---", b"--- ", b"\n---\n", b"...", b"\n...\n", b"&a1 ", b"*a1", b"&a1", b"*nope",
          b"| ", b"|\n", b"|-\n", b">\n", b"> ", b"|2\n", b"!!str ", b"!!int ", b"!!float ",
          b"!!bool ", b"!!null ", b"!!binary ", b"!!set ", b"!!map ", b"!!seq ", b"!!omap ",
          b"!!timestamp ", b"!!python/tuple ", b"!foo ", b"! ", b"!<tag:yaml.org,2002:str> ",
          b"? ", b"- ", b"# ", b" #", b"#", b": ", b"'#'", b'"#"', b"a: 1\n", b"{", b"[]", b"{}",
          b"\t", b"  ", b"\r\n", b"<<: ", b"${", b"}", b"~", b"null", b"=", b"<<"]


def m_token(rng, text):
    t = rng.choice(TOKENS)
    at = _pos(rng, text)
    return "insert %r at %d" % (t.decode(), at), _ins(text, at, t)


def m_crlf(rng, text):
    how = rng.randrange(4)
    if how == 0:
        return "all line ends CRLF", text.replace(b"\n", b"\r\n")
    if how == 1:
        return "all line ends CR", text.replace(b"\n", b"\r")
    ls = _lines(text)
    i = rng.randrange(len(ls))
    if how == 2:
        ls[i] = ls[i] + b"\r"
        return "CRLF on line %d" % (i + 1), b"\n".join(ls)
    ls[i] = ls[i] + b"\r" + (ls[i + 1] if i + 1 < len(ls) else b"")
    if i + 1 < len(ls):
        del ls[i + 1]
    return "lone CR ends line %d" % (i + 1), b"\n".join(ls)


BOM = b"\xef\xbb\xbf"


def m_bom(rng, text):
    how = rng.randrange(4)
    if how == 0:
        return "BOM at start", BOM + text
    if how == 1:
        at = _pos(rng, text)
        return "BOM at %d" % at, _ins(text, at, BOM)
    ls = _lines(text)
    i = rng.randrange(len(ls))
    if how == 2:
        ls[i] = BOM + ls[i]
        return "BOM at start of line %d" % (i + 1), b"\n".join(ls)
    return "BOM twice at start", BOM + BOM + text


def m_long(rng, text):
    n = rng.choice([1000, 1023, 1024, 1025, 1030, 4096, 70000, 200000])
    how = rng.randrange(4)
    ls = _lines(text)
    i = rng.randrange(len(ls))
    if how == 0:
        return "line %d gets %d more chars" % (i + 1, n), b"\n".join(
            ls[:i] + [ls[i] + b"x" * n] + ls[i + 1:])
    if how == 1:
        return "long key (%d) at top" % n, b"k" * n + b": 1\n" + text
    if how == 2:
        return "long quoted key (%d) at top" % n, b'"' + b"k" * n + b'": 1\n' + text
    return "long value (%d) at top" % n, b"long_value: " + b"v" * n + b"\n" + text


def _nest(rng, d):
    how = rng.randrange(5)
    if how in (2, 3):
        d = min(d, 1500)  # block nesting is quadratic in size
    if how == 0:
        return "flow seq depth %d" % d, b"[" * d + b"1" + b"]" * d
    if how == 1:
        return "flow map depth %d" % d, b"{a: " * d + b"1" + b"}" * d
    if how == 2:
        s = b""
        for k in range(d):
            s += b"\n" + b" " * (k + 1) + b"k%d:" % k
        return "block map depth %d" % d, s + b" 1"
    if how == 3:
        s = b""
        for k in range(d):
            s += b"\n" + b" " * (k + 1) + b"-"
        return "block seq depth %d" % d, s + b" 1"
    return "mixed flow depth %d" % d, b"[{a: " * (d // 2) + b"1" + b"}]" * (d // 2)


# OmegaConf has no fixed nesting limit: it fails with RecursionError at
# Python's recursion limit, at 80-110 levels from a shallow stack depending on
# the shapes AND on the caller's stack depth (one more frame above
# OmegaConf.load moves the edge), fewer inside a NeMo restore. nemofs refuses
# more than 64 levels (the root mapping counts). Depths in 65..199 have no
# caller-independent answer, so the corpus takes depths up to the bound and
# from 200 on, where every caller gets the same verdict.
NEST_LIMIT = 64


def m_deep(rng, text):
    d = rng.choice([2, 10, 32, 50, NEST_LIMIT - 1, 200, 300, 500, 1000, 5000])
    desc, v = _nest(rng, d)
    return desc + " as value of 'deep'", b"deep: " + v + b"\n" + text


def m_dup(rng, text):
    ls = _lines(text)
    keyed = [i for i, l in enumerate(ls) if b":" in l and not l.lstrip().startswith((b"#", b"-"))]
    if not keyed:
        return m_char(rng, text)
    i = rng.choice(keyed)
    how = rng.randrange(4)
    line = ls[i]
    ind = line[:len(line) - len(line.lstrip(b" "))]
    key = line.lstrip(b" ").split(b":", 1)[0]
    if how == 0:
        new = line
    elif how == 1:
        new = ind + b'"' + key + b'": dup'
    elif how == 2:
        new = ind + b"'" + key + b"': dup"
    else:
        new = ind + key + b" : dup"
    j = i + 1 if rng.randrange(2) else i
    return "duplicate key of line %d (form %d)" % (i + 1, how), b"\n".join(ls[:j] + [new] + ls[j:])


def m_directive(rng, text):
    d = rng.choice([b"%YAML 1.1\n---\n", b"%YAML 1.2\n---\n", b"%YAML 1.3\n---\n",
                    b"%YAML 1.0\n---\n", b"%YAML 2.0\n---\n", b"%YAML 1.1\n", b"%YAML 1.1\n%YAML 1.1\n---\n",
                    b"%YAML 1.9 # c\n---\n", b"%YAML 1.10\n---\n", b"%TAG ! tag:example.com,2000:\n---\n",
                    b"%TAG !e! tag:yaml.org,2002:\n---\n", b"%FOO bar\n---\n", b"%YAML 1.1\n--- # x\n",
                    b"---\n", b"--- \n", b"...\n", b"%YAML  1.3  \n---\n"])
    if rng.randrange(4) == 0:
        text = text.replace(b"\n", b"\r\n")
        d = d.replace(b"\n", b"\r\n")
        return "directive %r, CRLF" % d.decode(), d + text
    return "directive %r" % d.decode(), d + text


MERGES = [b"merged:\n  <<: *m1\n  extra: 1\n", b"merged:\n  <<: {x: 1}\n  y: 2\n",
          b"merged:\n  <<: [*m1, {z: 3}]\n", b"merged:\n  <<: 1\n", b"merged:\n  <<:\n",
          b"merged:\n  <<: [1, 2]\n", b"merged:\n  <<: *m1\n  <<: {w: 1}\n",
          b"merged: {<<: *m1}\n", b"merged:\n  <<: []\n", b"merged:\n  <<: {}\n",
          b"merged:\n  <<: *nope\n", b"merged: <<\n", b"merged:\n  - <<\n", b"<<: {a: 1}\n",
          b"<<: *m1\n", b"merged:\n  <<: !!map {x: 1}\n", b"merged:\n  <<: [*m1, *m1]\n"]


def m_merge(rng, text):
    ls = _lines(text)
    maps = [i for i, l in enumerate(ls) if l and not l.startswith((b" ", b"#")) and l.rstrip().endswith(b":")]
    add = rng.choice(MERGES)
    if maps and rng.randrange(5):
        i = rng.choice(maps)
        ls[i] = ls[i].rstrip() + b" &m1"
        return "anchor &m1 on line %d, then %r" % (i + 1, add.decode()), b"\n".join(ls) + b"\n" + add
    return "merge %r" % add.decode(), text.rstrip(b"\n") + b"\n" + add


INTERP = ["${model.x}", "${oc.env:HOME}", "${}", "${a.b", "${foo:bar,baz}", "${[a]}", "\\${x}",
          "${a}${b}", "${ x }", "${.x}", "${..x}", "${a:{b: 1}}", "${a:'q'}", "${a:\"q\"}", "${a:[1,2]}",
          "${a.${b}}", "${a:}", "${a:,}", "${a: 1, 2}", "${a:b:c}", "${a-b}", "${1}", "${a.1}",
          "${a[0]}", "${a.[0]}", "${a.b:c}", "$ {a}", "${{}", "${a}}", "x${a}y", "${a:{}}",
          "${a:{b}}", "${a:{1: 2}}", "${a:[}", "${a:'}", "${a:\\,}", "${a:\\}}", "${oc.select:a,b}",
          "${ a . b }", "${a:${b}}", "${\"a\"}", "${a :b}", "${a.b.c.d}", "${a:b\\ c}", "${a:%}",
          "${a:@x}", "${a:?}", "${a:x=y}", "${a:=}", "${a b}", "${-a}", "${_a}", "${a..b}",
          "${a. b}", "${a .b}", "${[ a ]}", "${a[ b]}", "${a [b]}", "${ .a}", "${. a}", "${a: b }",
          "${ ${a} }", "${a.${ b }}", "${oc.env :x}", "${oc . env:x}", "${a}[0]", "${a[b][c]}"]


def m_interp(rng, text):
    v = rng.choice(INTERP)
    if rng.randrange(3) == 0:
        cut = rng.randrange(len(v) + 1)
        v = v[:cut]
    q = rng.choice(["", "'", '"'])
    val = v
    if q == "'":
        val = "'" + v.replace("'", "''") + "'"
    elif q == '"':
        val = '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    ls = _lines(text)
    vals = [i for i, l in enumerate(ls) if b": " in l and not l.lstrip().startswith(b"#")]
    if vals and rng.randrange(3):
        i = rng.choice(vals)
        k = ls[i].split(b": ", 1)[0]
        ls[i] = k + b": " + val.encode()
        return "value of line %d := %s" % (i + 1, val), b"\n".join(ls)
    return "add interp: %s" % val, b"interp: " + val.encode() + b"\n" + text


HASH = [b"'x # y'", b'"x # y"', b"x#y", b"x #y", b"'#'", b'"#"', b"#", b"' #'", b'"a" # c',
        b"'a'#c", b"[a, '#']", b"{a: '#b'}", b"[a #c\n]", b"'x\n  # y'"]


def m_hash(rng, text):
    v = rng.choice(HASH)
    ls = _lines(text)
    vals = [i for i, l in enumerate(ls) if b": " in l and not l.lstrip().startswith(b"#")]
    if vals:
        i = rng.choice(vals)
        ls[i] = ls[i].split(b": ", 1)[0] + b": " + v
        return "value of line %d := %r" % (i + 1, v.decode()), b"\n".join(ls)
    return "add %r" % v.decode(), b"h: " + v + b"\n" + text


def m_delete(rng, text):
    if not text:
        return m_char(rng, text)
    at = rng.randrange(len(text))
    n = rng.choice([1, 1, 2, 5])
    return "delete %d bytes at %d" % (n, at), text[:at] + text[at + n:]


def m_indent(rng, text):
    ls = _lines(text)
    i = rng.randrange(len(ls))
    how = rng.randrange(3)
    if how == 0:
        ls[i] = b" " + ls[i]
    elif how == 1 and ls[i].startswith(b" "):
        ls[i] = ls[i][1:]
    else:
        ls[i] = b"\t" + ls[i].lstrip(b" ")
    return "reindent line %d (%d)" % (i + 1, how), b"\n".join(ls)


# Nested interpolations: OmegaConf's ANTLR parser is recursive too and fails
# with RecursionError at 150-500 levels (shape- and stack-dependent); nemofs
# refuses more than 64. Same choice of depths as m_deep.
def m_interp_deep(rng, text):
    d = rng.choice([1, 8, 32, 60, 500, 1000])
    how = rng.randrange(4)
    if how == 0:
        v, desc = "${a:" * d + "1" + "}" * d, "nested resolvers"
    elif how == 1:
        v, desc = "${" * d + "a" + "}" * d, "nested keys"
    elif how == 2:
        v, desc = "${a:" + "[" * d + "]" * d + "}", "nested list argument"
    else:
        v, desc = "${a:" + "{a:" * d + "1" + "}" * d + "}", "nested dict argument"
    return "%s, depth %d" % (desc, d), b"interp: '" + v.encode() + b"'\n" + text


def m_onestring(rng, text):
    """The top level becomes one string (OmegaConf loads a str again as YAML)."""
    how = rng.randrange(6)
    ls = _lines(text)
    if how == 0:
        return "whole config as a literal block", b"|\n" + b"\n".join(b"  " + l for l in ls)
    if how == 1:
        return "whole config as a folded block", b">\n" + b"\n".join(b"  " + l for l in ls)
    i = rng.randrange(len(ls))
    line = ls[i].strip()
    if how == 2:
        return "line %d alone, double-quoted" % (i + 1), b'"' + line.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"\n'
    if how == 3:
        return "line %d alone, single-quoted" % (i + 1), b"'" + line.replace(b"'", b"''") + b"'\n"
    if how == 4:
        return "line %d alone, !!str" % (i + 1), b"!!str " + line + b"\n"
    return "line %d alone" % (i + 1), line + b"\n"


MUTATIONS = [("cut", m_cut), ("char", m_char), ("token", m_token), ("crlf", m_crlf), ("bom", m_bom),
             ("long", m_long), ("deep", m_deep), ("dup", m_dup), ("directive", m_directive),
             ("merge", m_merge), ("interp", m_interp), ("hash", m_hash), ("delete", m_delete),
             ("indent", m_indent), ("onestring", m_onestring),
             ("interp_deep", m_interp_deep)]


def corpus(configs, n, seed):
    """n (id, base name, mutation, bytes), deterministic for (configs, n, seed)."""
    rng = random.Random(seed)
    out = []
    for k in range(n):
        kind, fn = MUTATIONS[k % len(MUTATIONS)]
        name, text = configs[rng.randrange(len(configs))]
        desc, new = fn(rng, text)
        out.append(("%05d" % k, name, "%s: %s" % (kind, desc), new))
    return out


# ---- the oracle --------------------------------------------------------------

def oracle(path):
    """(accepted, why): OmegaConf.load(path) loads it and gives a DictConfig with >= 1 key."""
    from omegaconf import DictConfig, OmegaConf
    try:
        cfg = OmegaConf.load(path)
    except RecursionError:
        return False, "RecursionError"
    except Exception as e:  # every refusal of the loader counts
        return False, "%s: %s" % (type(e).__name__, str(e).splitlines()[0] if str(e) else "")
    if not isinstance(cfg, DictConfig):
        return False, "top level is %s" % type(cfg).__name__
    if len(cfg) == 0:
        return False, "empty mapping"
    return True, "ok"


def write_cases(cases, d):
    paths = []
    for cid, _, _, text in cases:
        p = os.path.join(d, cid + ".yaml")
        with open(p, "wb") as f:
            f.write(text)
        paths.append(p)
    return paths


def run_validator(cli, paths):
    r = subprocess.run([cli, "-"], input="\n".join(paths) + "\n", capture_output=True, text=True,
                       timeout=120)
    if r.returncode not in (0, 1):
        sys.exit("yaml_check_cli failed (%d): %s" % (r.returncode, r.stderr))
    got = {}
    for line in r.stdout.splitlines():
        parts = line.split("\t", 2)
        got[parts[1]] = (parts[0] == "OK", parts[2] if len(parts) > 2 else "")
    return got


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cli", help="the yaml_check_cli binary")
    ap.add_argument("--cases", type=int, default=2100)
    ap.add_argument("--seed", type=int, default=16)
    ap.add_argument("--real", default=REAL, help="shared/real-fixtures (optional)")
    ap.add_argument("--emit", help="write a sample and its oracle verdicts here (mount test)")
    ap.add_argument("--sample", type=int, default=200)
    ap.add_argument("--jobs", type=int, default=2, help="oracle processes")
    args = ap.parse_args()
    sys.setrecursionlimit(1000)  # Python's default, what NeMo runs with

    configs = real_configs(args.real)
    if not configs:
        sys.exit("no real configs found under %s" % DATA)
    for name, text in configs:
        path = None
        with tempfile.NamedTemporaryFile(suffix=".yaml", delete=False) as f:
            f.write(text)
            path = f.name
        ok, why = oracle(path)
        os.unlink(path)
        if not ok:
            sys.exit("base config %s is not loadable: %s" % (name, why))

    if args.emit:
        cases = corpus(configs, args.cases, args.seed)
        rng = random.Random(args.seed + 1)
        # Mount sample: bounded sizes (each accepted text is saved into the checkpoint).
        pool = [c for c in cases if len(c[3]) <= 16384]
        sample = sorted(rng.sample(pool, min(args.sample, len(pool))))
        os.makedirs(args.emit, exist_ok=True)
        paths = write_cases(sample, args.emit)
        with open(os.path.join(args.emit, "manifest.tsv"), "w") as m:
            for (cid, name, desc, _), p in zip(sample, paths):
                ok, _ = oracle(p)
                m.write("%s\t%d\t%s <- %s\n" % (cid, ok, desc.replace("\t", " ").replace("\n", "\\n"), name))
        print("%d cases in %s (%d configs)" % (len(sample), args.emit, len(configs)))
        return 0

    if not args.cli:
        ap.error("--cli or --emit is required")
    cases = corpus(configs, args.cases, args.seed)
    with tempfile.TemporaryDirectory(prefix="yaml_corpus.") as d:
        paths = write_cases(cases, d)
        got = run_validator(args.cli, paths)
        with multiprocessing.Pool(args.jobs) as pool:
            verdicts = pool.map(oracle, paths, chunksize=16)
        bad = 0
        accepted = 0
        for (cid, name, desc, _), p, (want, why) in zip(cases, paths, verdicts):
            have, msg = got.get(p, (None, "no verdict"))
            accepted += want
            if have != want:
                bad += 1
                print("DISAGREE %s [%s <- %s]: OmegaConf %s (%s), nemofs %s (%s)" % (
                    cid, desc.replace("\n", "\\n")[:200], name, "accepts" if want else "refuses",
                    why[:200], "accepts" if have else "refuses", msg[:200]))
    print("%d cases from %d real configs (%s): %d accepted by OmegaConf, %d disagreements" % (
        len(cases), len(configs), ", ".join(n for n, _ in configs), accepted, bad))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
