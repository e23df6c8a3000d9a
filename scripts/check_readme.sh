#!/usr/bin/env bash
# Runs every command of README.md as written, and checks its Rust example is the file it names.
# Each ```sh block is tagged by the HTML comment on the line before it:
#   <!-- readme-test: cli -->      each line runs from the repository root, `scconv-tch` being the
#                                  debug build (target/debug on PATH); any failure fails the test;
#   <!-- readme-test: project -->  the "use it in your project" steps, run in a fresh folder outside
#                                  this tree that holds this checkout as `scconv-tch` (a link): a new
#                                  project is created, depends on the crate, is built and run (it checks
#                                  its output against PyTorch's); then readelf must show libtorch_cuda.so
#                                  NEEDED, and the library must bring none of the CLI's dependencies;
#   <!-- readme-test: skip (why) --> not run, for the reason given.
# A ```sh block without a tag fails the test. The ```rust block tagged `example` must equal
# scripts/my_app_main.rs, the file the project steps copy. Every Python script must answer --help.
# The project is built into this checkout's target/ with its Cargo.lock, so torch-sys is reused, not
# rebuilt (tch is still built again).
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
cd "$repo_root"
work="$(mktemp -d "${TMPDIR:-/tmp}/scconv-readme.XXXXXX")"
trap 'rm -rf "$work"' EXIT

# Splits README.md into $work/block-N.{tag,lang,body}.
python3 - "$work" <<'PY'
import re, sys
out = sys.argv[1]
lines = open("README.md").read().split("\n")
n, i, tag = 0, 0, None
while i < len(lines):
    line = lines[i]
    m = re.fullmatch(r"<!-- readme-test: (\w+)(.*?) -->", line.strip())
    if m:
        tag = m.group(1)
    elif line.startswith("```") and len(line) > 3:
        lang = line[3:].strip()
        j = i + 1
        while not lines[j].startswith("```"):
            j += 1
        body = "\n".join(lines[i + 1:j]) + "\n"
        for ext, text in (("tag", tag or "untagged"), ("lang", lang), ("body", body)):
            open(f"{out}/block-{n}.{ext}", "w").write(text)
        n, i, tag = n + 1, j, None
    elif line.startswith("```"):
        j = i + 1
        while not lines[j].startswith("```"):
            j += 1
        i, tag = j, None
    i += 1
PY

run_cli_block() {
    local body="$1"
    cargo build --quiet --bin scconv-tch
    while IFS= read -r line; do
        [ -z "$line" ] && continue
        echo "readme: \$ $line"
        if ! PATH="$repo_root/target/debug:$PATH" bash -euo pipefail -c "$line" >"$work/out" 2>&1; then
            cat "$work/out" >&2
            echo "readme: FAILED: $line" >&2
            exit 1
        fi
        tail -n 3 "$work/out" | sed 's/^/    /'
    done <"$body"
}

run_project_block() {
    local body="$1"
    local folder="$work/project"
    mkdir -p "$folder"
    ln -s "$repo_root" "$folder/scconv-tch"
    # The block as written; before its `cargo run`, this checkout's Cargo.lock replaces the project's
    # so that dependencies resolve to the versions already built here (cargo adds the project's own
    # entry and keeps the rest).
    {
        echo 'set -euo pipefail'
        sed "s|^cargo run|cp '$repo_root/Cargo.lock' Cargo.lock; cargo run|" "$body"
    } >"$work/project.sh"
    grep -q "^cp '$repo_root/Cargo.lock'" "$work/project.sh" || { echo "readme: no cargo run step" >&2; exit 1; }
    echo "readme: the project steps, in $folder:"
    sed 's/^/    /' "$body"
    # Into this checkout's target/, with its build scripts' profile (Cargo.toml says why), so that
    # torch-sys is reused.
    (cd "$folder" && CARGO_TARGET_DIR="$repo_root/target" CARGO_PROFILE_DEV_BUILD_OVERRIDE_DEBUG=false \
        bash "$work/project.sh") 2>&1 | tee "$work/project.out"
    # A path dependency's warnings reach the user's build output: the library alone builds clean.
    if grep -q '^warning: `scconv-tch` (lib) generated' "$work/project.out"; then
        echo "readme: FAILED: the library alone (no default features) builds with warnings" >&2
        exit 1
    fi
    local binary="$repo_root/target/debug/my-app"
    local needed
    needed="$(readelf -d "$binary" | grep NEEDED)"
    if [ -f "$repo_root/.libtorch/lib/libtorch_cuda.so" ] && ! grep -q 'libtorch_cuda.so' <<<"$needed"; then
        echo "readme: FAILED: libtorch_cuda.so is not NEEDED by $binary:" >&2
        echo "$needed" >&2
        exit 1
    fi
    local direct
    direct="$(cd "$folder/my-app" && cargo tree -e normal -p scconv-tch --depth 1 --prefix none)"
    # (flate2 is not among them: it is zip's deflate backend, which the library's torch.save reader needs.)
    for cli_only in clap indicatif image anyhow; do
        if grep -q "^$cli_only " <<<"$direct"; then
            echo "readme: FAILED: $cli_only (a CLI dependency) is a dependency of the library:" >&2
            echo "$direct" >&2
            exit 1
        fi
    done
    echo "readme: the project runs; libtorch_cuda.so is NEEDED; the library builds without warnings and brings no CLI dependency"
}

for tag_file in "$work"/block-*.tag; do
    block="${tag_file%.tag}"
    tag="$(cat "$tag_file")"
    lang="$(cat "$block.lang")"
    case "$tag:$lang" in
        cli:sh) run_cli_block "$block.body" ;;
        project:sh) run_project_block "$block.body" ;;
        example:rust)
            if ! diff -u scripts/my_app_main.rs "$block.body"; then
                echo "readme: FAILED: the README's example differs from scripts/my_app_main.rs" >&2
                exit 1
            fi
            echo "readme: the Rust example is scripts/my_app_main.rs" ;;
        skip:*) echo "readme: skipped a $lang block, as its tag says" ;;
        untagged:sh | *:sh)
            echo "readme: FAILED: a \`\`\`sh block has no readme-test tag:" >&2
            cat "$block.body" >&2
            exit 1 ;;
        *) ;;
    esac
done

# Two at a time (each imports torch, ~1.5 s of one core): 31 s -> 16 s on two cores.
answers_help() {
    local out="$work/help-${1//\//-}.out"
    if ! .venv/bin/python "$1" --help >"$out" 2>&1; then
        cat "$out" >&2
        echo "readme: FAILED: $1 --help" >&2
        return 1
    fi
}
export -f answers_help
export work
printf '%s\0' scripts/*.py parity/*.py | xargs -0 -P 2 -n 1 bash -c 'answers_help "$0"'
echo "readme: every command ran; every Python script answers --help"
