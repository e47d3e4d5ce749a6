#!/usr/bin/env bash
# Build the masksup-med images without an image registry, and without internet at image build time.
#
#   docker/build-image.sh wheelhouse [--torch-wheel FILE | --torch-index URL] [--wheelhouse DIR]
#       on a machine that reaches PyPI: every Python package the image installs, as wheels (torch, the
#       pins of docker/constraints.txt, the project itself), into DIR (default docker/wheels/)
#   docker/build-image.sh base [--mirror URL] [--base NAME]
#       as root, with debootstrap: a Debian bookworm image with Python 3.11 from a Debian mirror
#       (default: the one this machine's apt uses), imported as NAME (default masksup-base:bookworm)
#   docker/build-image.sh image [--base IMAGE] [--tag TAG] [--wheelhouse DIR]
#       the masksup-med image from the wheelhouse; the build runs with --network none
#   docker/build-image.sh postgres [--base IMAGE] [--postgres-tag TAG]
#       PostgreSQL from Debian's package on the same base, for docker/compose.yaml (needs the mirror)
#   docker/build-image.sh all [options]
#       base (unless IMAGE exists), wheelhouse (unless DIR holds one), image, postgres
#
# PYTHON (default python3) is the Python 3.11 that builds the wheelhouse. See docker/README.md.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DOCKERFILE=$REPO/docker/Dockerfile
CONTEXT_WHEELS=$REPO/docker/wheels   # where the Dockerfile finds the wheelhouse (inside the build context)
CONSTRAINTS=$REPO/docker/constraints.txt

project_version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$REPO/pyproject.toml" | head -n 1)
torch_version=$(sed -n 's/^torch==\(.*\)$/\1/p' "$CONSTRAINTS")

base=masksup-base:bookworm
tag=masksup-med:$project_version
postgres_tag=masksup-postgres:15
wheelhouse=$CONTEXT_WHEELS
mirror=""
torch_wheel=""
torch_index=https://download.pytorch.org/whl/cpu
python=${PYTHON:-python3}

say() { echo "build-image: $*" >&2; }
die() { echo "build-image: error: $*" >&2; exit 1; }

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2
    exit "${1:-2}"
}

root_cmd() {  # run as root (sudo when not root)
    if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi
}

need_docker() {
    command -v docker > /dev/null || die "no docker command (install docker.io)"
    docker info > /dev/null 2>&1 || die "no Docker daemon answers (DOCKER_HOST=${DOCKER_HOST:-unset}); start dockerd"
}

# ------------------------------------------------------------------------------------------ wheelhouse
build_wheelhouse() {
    command -v "$python" > /dev/null || die "no $python (set PYTHON to a Python 3.11)"
    "$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
        || die "the wheelhouse needs Python 3.11, the image's; $python is $("$python" -V 2>&1) (set PYTHON)"
    [[ -n $torch_version ]] || die "no torch pin in $CONSTRAINTS"

    local partial=$wheelhouse.partial src
    rm -rf "$partial"
    mkdir -p "$partial"
    if [[ -n $torch_wheel ]]; then
        [[ -f $torch_wheel ]] || die "--torch-wheel $torch_wheel: no such file"
        cp "$torch_wheel" "$partial/"
    else
        say "torch==$torch_version from $torch_index"
        "$python" -m pip download --quiet --no-deps --no-cache-dir --dest "$partial" \
            --index-url "$torch_index" "torch==$torch_version" || die "could not download torch from $torch_index"
    fi
    local torch_files=("$partial"/torch-*.whl)
    [[ ${#torch_files[@]} -eq 1 && -f ${torch_files[0]} ]] || die "expected one torch wheel, found: ${torch_files[*]}"
    local torch_file=${torch_files[0]}
    local found=${torch_file##*/torch-}
    found=${found%%-*}
    [[ ${found%%+*} == "$torch_version" ]] || die "torch wheel $torch_file is $found, constraints.txt pins $torch_version"

    # the project from a clean copy of its sources (a stale build/ folder cannot leak into the wheel)
    src=$(mktemp -d)
    tar -C "$REPO" --exclude=__pycache__ -cf - pyproject.toml README.md masksup_med | tar -C "$src" -xf -
    "$python" -m pip wheel --quiet --no-deps --no-cache-dir --wheel-dir "$partial" "$src" \
        || { rm -rf "$src"; die "could not build the masksup-med wheel"; }
    rm -rf "$src"
    local project_file=("$partial"/masksup_med-"$project_version"-*.whl)
    [[ -f ${project_file[0]} ]] || die "no masksup_med-$project_version wheel was built"

    # everything they need, at the pinned versions; sdists are built into wheels here, on the host
    say "dependencies (pins of docker/constraints.txt)"
    "$python" -m pip wheel --quiet --no-cache-dir --wheel-dir "$partial" --find-links "$partial" \
        --constraint "$CONSTRAINTS" "$torch_file" "${project_file[0]}[server]" \
        || die "could not fetch or build every dependency into the wheelhouse"

    rm -rf "$wheelhouse"
    mv "$partial" "$wheelhouse"
    say "wheelhouse $wheelhouse: $(find "$wheelhouse" -name '*.whl' | wc -l) wheels, $(du -sh "$wheelhouse" | cut -f1) (torch $found)"
}

check_wheelhouse() {  # $1: folder
    compgen -G "$1/torch-$torch_version*.whl" > /dev/null \
        || die "no torch-$torch_version wheel in $1: run '$0 wheelhouse' on a connected machine (docker/README.md)"
    compgen -G "$1/masksup_med-$project_version-*.whl" > /dev/null \
        || die "no masksup_med-$project_version wheel in $1: rebuild the wheelhouse from this checkout"
}

# the wheelhouse into the build context (docker/wheels), when it lies elsewhere
stage_wheelhouse() {
    check_wheelhouse "$wheelhouse"
    if [[ $(realpath "$wheelhouse") != "$(realpath -m "$CONTEXT_WHEELS")" ]]; then
        rm -rf "$CONTEXT_WHEELS"
        cp -al "$wheelhouse" "$CONTEXT_WHEELS" 2> /dev/null || cp -a "$wheelhouse" "$CONTEXT_WHEELS"
    fi
}

# ------------------------------------------------------------------------------------------- base
debian_mirror() {  # the bookworm mirror this machine's apt uses, else deb.debian.org
    local uri
    # shellcheck disable=SC2016 # apt's own $(FIELD) placeholders
    uri=$(apt-get indextargets --format '$(CODENAME) $(REPO_URI)' 2> /dev/null | awk '$1 == "bookworm" {print $2; exit}' || true)
    echo "${uri:-http://deb.debian.org/debian/}"
}

rootfs=""
cleanup_rootfs() {
    [[ -n $rootfs && -d $rootfs ]] || return 0
    # debootstrap mounts /proc and /sys inside while it installs: unmount anything left before deleting
    findmnt -rn -o TARGET | { grep "^$rootfs/" || true; } | sort -r | while read -r mount; do root_cmd umount -l "$mount" || true; done
    root_cmd rm -rf --one-file-system "$rootfs"
}

build_base() {
    command -v debootstrap > /dev/null || die "no debootstrap (apt-get install debootstrap)"
    need_docker
    [[ -n $mirror ]] || mirror=$(debian_mirror)
    rootfs=$(mktemp -d "${TMPDIR:-/var/tmp}/masksup-rootfs.XXXXXX")
    trap cleanup_rootfs EXIT
    say "debootstrap bookworm from $mirror"
    root_cmd debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
        bookworm "$rootfs" "$mirror" > "$rootfs.log" 2>&1 \
        || { tail -n 20 "$rootfs.log" >&2; die "debootstrap failed (log above, $rootfs.log)"; }
    rm -f "$rootfs.log"
    # package caches and lists: apt-get update brings the lists back when a package is installed
    root_cmd find "$rootfs/var/cache/apt" "$rootfs/var/lib/apt/lists" -type f -delete
    root_cmd tar -C "$rootfs" --numeric-owner -cf - . \
        | docker import --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' \
            --message "debootstrap --variant=minbase bookworm $mirror" - "$base" > /dev/null \
        || die "docker import of the debootstrap tree failed"
    cleanup_rootfs
    trap - EXIT
    say "base image $base: $(docker run --rm --network none "$base" python -V)"
}

# ------------------------------------------------------------------------------------------- images
build_image() {
    need_docker
    docker image inspect "$base" > /dev/null 2>&1 \
        || die "base image $base not found: make it with '$0 base', or load a Python 3.11 bookworm image and pass --base"
    stage_wheelhouse
    say "image $tag on $base"
    # the legacy builder: BuildKit wants its Dockerfile frontend from a registry. No network: every
    # package is in the wheelhouse
    DOCKER_BUILDKIT=0 docker build --network none --force-rm -f "$DOCKERFILE" \
        --build-arg BASE_IMAGE="$base" --build-arg TORCH_VERSION="$torch_version" -t "$tag" "$REPO" \
        || die "docker build of $tag failed (output above)"
    say "image $tag: $(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.2f GB", $1 / 1e9}')"
}

build_postgres() {
    need_docker
    docker image inspect "$base" > /dev/null 2>&1 || die "base image $base not found: make it with '$0 base'"
    say "image $postgres_tag on $base (Debian's postgresql package)"
    DOCKER_BUILDKIT=0 docker build --network host --force-rm -f "$REPO/docker/postgres/Dockerfile" \
        --build-arg BASE_IMAGE="$base" -t "$postgres_tag" "$REPO/docker/postgres" \
        || die "docker build of $postgres_tag failed (output above)"
}

# ------------------------------------------------------------------------------------------- main
[[ $# -ge 1 ]] || usage
command=$1
shift
while [[ $# -gt 0 ]]; do
    [[ $1 == -h || $1 == --help ]] && usage 0
    [[ $# -ge 2 ]] || die "$1 needs a value"
    case $1 in
        --base) base=$2 ;;
        --tag) tag=$2 ;;
        --postgres-tag) postgres_tag=$2 ;;
        --wheelhouse) wheelhouse=$2 ;;
        --mirror) mirror=$2 ;;
        --torch-wheel) torch_wheel=$2 ;;
        --torch-index) torch_index=$2 ;;
        *) die "unknown option $1 (see $0 --help)" ;;
    esac
    shift 2
done

case $command in
    wheelhouse) build_wheelhouse ;;
    base) build_base ;;
    image) build_image ;;
    postgres) build_postgres ;;
    all)
        need_docker
        docker image inspect "$base" > /dev/null 2>&1 || build_base
        compgen -G "$wheelhouse/masksup_med-$project_version-*.whl" > /dev/null || build_wheelhouse
        build_image
        build_postgres
        ;;
    -h | --help) usage 0 ;;
    *) die "unknown command $command (wheelhouse, base, image, postgres, all)" ;;
esac
