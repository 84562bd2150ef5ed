#!/usr/bin/env bash
# Install the Debian packages the cluster tests (tests/cluster) run for real:
#   slurm-wlm  - slurmctld, slurmd and the client commands (sbatch, srun, scontrol, ...)
#   munge      - the authentication daemon slurm needs
#   iproute2   - `ip netns` / veth pairs for the two-host process-group tests
#   openssh-server, pdsh - sshd in each namespace and the pdsh runner DeepSpeed's multi-node
#                launcher uses (`deepspeed --hostfile ...`), for the hostfile test
# Only missing packages are installed, as root or through password-less sudo (sudo -n: it never waits
# for a password, e.g. on a cluster login node); when that is not possible or the install fails, the
# script warns and exits 0: the tests that need them are then skipped with that reason.
#
#   scripts/install_cluster_deps.sh
set -euo pipefail

# package -> a file it installs (what we check for; dpkg -s would also accept a half-removed package)
declare -A PROVIDES=([slurm-wlm]=/usr/sbin/slurmctld [munge]=/usr/sbin/munged [iproute2]=/usr/sbin/ip)
# slurmd lives in its own package on Debian; slurm-wlm depends on it, but check it too.
PROVIDES[slurmd]=/usr/sbin/slurmd
# DeepSpeed's default multi-node runner: pdsh over ssh to an sshd on every host of the hostfile.
PROVIDES[openssh-server]=/usr/sbin/sshd
PROVIDES[pdsh]=/usr/bin/pdsh

missing=()
for pkg in "${!PROVIDES[@]}"; do
    [ -e "${PROVIDES[$pkg]}" ] || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0

skipped() {
    echo "WARNING: skipped installing Debian's ${missing[*]} ($1): the cluster tests (tests/cluster) need them" \
        "and are skipped until then; install them as root: apt-get install ${missing[*]}" >&2
    exit 0
}
if [ "$(id -u)" = 0 ]; then
    SUDO=()
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
else
    skipped "it needs root or password-less sudo"
fi
echo "install_cluster_deps: installing ${missing[*]}"
# The tests start their own daemons (own config, own munge key): the packages' services are not needed.
"${SUDO[@]}" apt-get update -qq || skipped "apt-get update failed"
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || skipped "apt-get install failed"
