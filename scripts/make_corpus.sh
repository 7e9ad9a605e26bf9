#!/usr/bin/env bash
# Builds gbmoe's default multi-domain text corpus from Debian packages: OUT_DIR/raw/<domain>/*.txt,
# one document per file, each domain capped at the same size. Runs once: a complete corpus is kept.
#
# Usage: scripts/make_corpus.sh [OUT_DIR]   (default OUT_DIR: data)
#   then: gbmoe-data --input OUT_DIR/raw --output OUT_DIR/corpus --vocab-size 4096
# Domains (all from Debian 12 packages, fetched with apt-get download, unpacked with dpkg-deb -x):
#   english  King James Bible (bible-kjv + bible-kjv-text), a few chapters per document
#   german   Debian-Handbuch de-DE pages (debian-handbook, German paragraphs only) + fortunes-de
#   cpp      the C++ standard library headers (libstdc++-12-dev)
#   python   the Python standard library (libpython3.11-stdlib)
#   math     Coq's standard library proofs (libcoq-stdlib)
# Settings (environment): CORPUS_DOMAIN_BYTES (default 2000000) caps each domain's text.
set -euo pipefail

out=${1:-data}
domain_bytes=${CORPUS_DOMAIN_BYTES:-2000000}
packages=(bible-kjv bible-kjv-text debian-handbook fortunes-de libstdc++-12-dev
  libpython3.11-stdlib libcoq-stdlib)

die() {
  echo "make_corpus: $*" >&2
  exit 1
}

[[ "$domain_bytes" =~ ^[0-9]+$ ]] && ((domain_bytes >= 10000)) ||
  die "CORPUS_DOMAIN_BYTES ($domain_bytes) must be an integer >= 10000"
command -v apt-get >/dev/null || die "apt-get not found: the corpus comes from Debian packages"
command -v dpkg-deb >/dev/null || die "dpkg-deb not found: the corpus comes from Debian packages"
python=$(command -v python3 || true)
[ -n "$python" ] || die "python3 not found: it extracts the text from the unpacked packages"

mkdir -p "$out" || die "cannot create OUT_DIR ($out)"
out=$(cd "$out" && pwd)
raw="$out/raw"
manifest="domain_bytes=$domain_bytes packages=${packages[*]} format=2"
if [ -f "$raw/.complete" ] && [ "$(cat "$raw/.complete")" = "$manifest" ]; then
  echo "make_corpus: $raw is complete; nothing to do (remove it to rebuild)"
  exit 0
fi

# 1. Download each package once into OUT_DIR/debs and unpack it into OUT_DIR/unpacked/<package>.
debs="$out/debs"
unpacked="$out/unpacked"
mkdir -p "$debs" "$unpacked"
for p in "${packages[@]}"; do
  if ! compgen -G "$debs/${p}_*.deb" >/dev/null; then
    echo "make_corpus: downloading $p"
    (cd "$debs" && apt-get download -q -o APT::Sandbox::User=root "$p" >/dev/null) ||
      die "apt-get download $p failed (is the package list current? run apt-get update)"
  fi
  if [ ! -f "$unpacked/$p/.unpacked" ]; then
    deb=$(compgen -G "$debs/${p}_*.deb" | head -n 1)
    rm -rf "$unpacked/$p"
    mkdir -p "$unpacked/$p"
    dpkg-deb -x "$deb" "$unpacked/$p" || die "dpkg-deb -x $deb failed"
    touch "$unpacked/$p/.unpacked"
  fi
done

# 2. The Bible as text: the package's own reader dumps it (it reads the compressed data file).
bible_txt="$unpacked/bible-kjv.txt"
if [ ! -s "$bible_txt" ]; then
  "$unpacked/bible-kjv/usr/bin/bible" -p "$unpacked/bible-kjv-text/usr/lib" "Gen1:1-Rev22:21" \
    >"$bible_txt.tmp" || die "the bible reader of bible-kjv failed on $unpacked/bible-kjv-text"
  mv "$bible_txt.tmp" "$bible_txt"
fi

# 3. Gather the documents of each domain into a staging directory, then swap it into place.
staging="$out/raw.tmp-$$"
rm -rf "$staging"
trap 'rm -rf "$staging"' EXIT
"$python" - "$unpacked" "$staging" "$domain_bytes" <<'PY' || die "extracting the text failed"
import hashlib, html.parser, os, re, sys

unpacked, staging, cap = sys.argv[1], sys.argv[2], int(sys.argv[3])
MIN_DOC, MAX_FILE = 512, 150_000


def read(path):
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None  # not UTF-8: left out


def write_domain(domain, docs):
    """docs: (name, text). Takes them in a fixed pseudo-random order up to the byte cap."""
    docs = [(n, t) for n, t in docs if t is not None and len(t.encode()) >= MIN_DOC]
    if len(docs) < 2:
        sys.exit(f"domain {domain}: only {len(docs)} documents found")
    docs.sort(key=lambda d: hashlib.sha1(d[0].encode()).hexdigest())
    os.makedirs(os.path.join(staging, domain))
    total = count = 0
    for name, text in docs:
        size = len(text.encode())
        if total + size > cap:
            continue
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")
        path = os.path.join(staging, domain, safe + ".txt")
        while os.path.exists(path):
            path = path[:-4] + "_.txt"
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        total += size
        count += 1
    print(f"make_corpus: {domain:8s} {count:5d} documents {total / 1e6:6.2f} MB "
          f"(of {len(docs)} found)")


def files(root, suffixes, exclude=()):
    for d, subdirs, names in os.walk(root):
        subdirs.sort()
        for n in sorted(names):
            p = os.path.join(d, n)
            rel = os.path.relpath(p, root)
            if os.path.isfile(p) and not os.path.islink(p) and any(rel.endswith(s) for s in suffixes) \
                    and not any(x in rel for x in exclude) and os.path.getsize(p) <= MAX_FILE:
                yield rel, p


# english: the Bible, consecutive chapters of one book grouped into documents of >= 12 KB.
def bible_docs():
    text = open(os.path.join(unpacked, "bible-kjv.txt"), encoding="utf-8").read()
    chapters, current = [], None
    for line in text.splitlines():
        m = re.match(r"^(\S.*?) (\d+)$", line)
        if m:
            current = [m.group(1), int(m.group(2)), []]
            chapters.append(current)
        elif current is not None and line.strip():
            if re.match(r"^\s+\d+ ", line) or not current[2]:
                current[2].append(line.strip())
            else:
                current[2][-1] += " " + line.strip()  # unwrap the reader's 80-column lines
    docs, group = [], []
    def flush():
        if group:
            book, first, last = group[0][0], group[0][1], group[-1][1]
            body = "".join(f"{b} {c}\n\n" + "\n".join(v) + "\n\n" for b, c, v in group)
            docs.append((f"{book}_{first:03d}-{last:03d}", body))
            group.clear()
    for ch in chapters:
        if group and (group[0][0] != ch[0] or sum(len("".join(g[2])) for g in group) >= 12_000):
            flush()
        group.append(ch)
    flush()
    return docs


# german: handbook pages (paragraphs that read as German) and fortune files.
GERMAN = set("der die das und ist nicht ein eine sich mit auf für von den dem zu auch werden wird "
             "sie es im oder als bei nach wenn kann sind".split())
ENGLISH = set("the and is of to in that for with this are be it as can on you by from an or".split())


class Text(html.parser.HTMLParser):
    SKIP = {"script", "style", "head", "nav", "title"}
    BLOCK = {"p", "div", "br", "li", "h1", "h2", "h3", "h4", "pre", "tr", "dt", "dd", "table"}

    def __init__(self):
        super().__init__()
        self.out, self.skip = [], 0

    def handle_starttag(self, tag, attrs):
        self.skip += tag in self.SKIP
        if tag in self.BLOCK:
            self.out.append("\n\n")

    def handle_endtag(self, tag):
        self.skip -= tag in self.SKIP and self.skip > 0

    def handle_data(self, data):
        if not self.skip:
            self.out.append(data)


def german_paragraphs(text):
    keep = []
    for para in re.split(r"\n\s*\n", text):
        para = re.sub(r"[ \t]+", " ", para).strip()
        words = re.findall(r"[a-zäöüß]+", para.lower())
        de = sum(w in GERMAN for w in words)
        en = sum(w in ENGLISH for w in words)
        if len(words) >= 4 and de > en:
            keep.append(para)
    return "\n\n".join(keep) + "\n" if keep else None


def german_docs():
    docs = []
    html_dir = os.path.join(unpacked, "debian-handbook/usr/share/doc/debian-handbook/html/de-DE")
    for rel, p in files(html_dir, (".html",)):
        page = read(p)
        if page is None:
            continue
        parser = Text()
        parser.feed(page)
        docs.append(("handbuch_" + rel[:-5], german_paragraphs("".join(parser.out))))
    fortune_dir = os.path.join(unpacked, "fortunes-de/usr/share/games/fortunes/de")
    for name in sorted(os.listdir(fortune_dir)):
        p = os.path.join(fortune_dir, name)
        if os.path.islink(p) or "." in name or name == "asciiart":
            continue
        text = read(p)
        if text is not None:
            docs.append(("fortunes_" + name, re.sub(r"(?m)^%\s*$", "", text)))
    return docs


write_domain("english", bible_docs())
write_domain("german", german_docs())
write_domain("cpp", [(r, read(p)) for r, p in files(
    os.path.join(unpacked, "libstdc++-12-dev/usr/include/c++/12"), ("",))])
write_domain("python", [(r, read(p)) for r, p in files(
    os.path.join(unpacked, "libpython3.11-stdlib/usr/lib/python3.11"), (".py",))])
write_domain("math", [(r, read(p)) for r, p in files(
    os.path.join(unpacked, "libcoq-stdlib/usr/lib/ocaml/coq/theories"), (".v",))])
PY
echo "$manifest" >"$staging/.complete"
rm -rf "$raw"
mv "$staging" "$raw"
trap - EXIT
rm -rf "$unpacked"  # large (Coq's compiled proofs); the .debs stay cached in $debs
echo "make_corpus: wrote $raw ($(du -sh "$raw" | cut -f1)); next:"
echo "  gbmoe-data --input $raw --output $out/corpus --vocab-size 4096"
