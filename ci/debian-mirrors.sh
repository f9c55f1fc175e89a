# shellcheck shell=bash
# Sourced by ci/provision-qemu.sh and images/build-linux.sh: where this machine's apt gets Debian
# packages from, so that both can fetch packages of another Debian release through a private apt
# configuration without touching the system's.

# Prints "URI SUITE" per enabled deb source entry of the machine (one-line and deb822 formats).
apt_sources() {
    local f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -f $f ]] || continue
        sed -e 's/#.*//' -e 's/\[[^]]*\]//' "$f" |
            awk '$1 == "deb" && NF >= 3 { print $2, $3 }'
    done
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -f $f ]] || continue
        awk '
            function flush(   i, j, nu, ns, u, s) {
                if (types ~ /(^|[ \t])deb([ \t]|$)/ && tolower(enabled) != "no") {
                    nu = split(uris, u, /[ \t]+/); ns = split(suites, s, /[ \t]+/)
                    for (i = 1; i <= nu; i++) for (j = 1; j <= ns; j++)
                        if (u[i] != "" && s[j] != "") print u[i], s[j]
                }
                types = uris = suites = enabled = ""
            }
            /^[ \t]*#/ { next }
            /^[ \t]*$/ { flush(); next }
            {
                key = tolower($0); sub(/:.*/, "", key)
                val = $0; sub(/^[^:]*:[ \t]*/, "", val)
                if (key == "types") types = val
                else if (key == "uris") uris = val
                else if (key == "suites") suites = val
                else if (key == "enabled") enabled = val
            }
            END { flush() }' "$f"
    done
}

# Sets MIRROR and SECURITY_MIRROR: a Debian archive URI from the machine's sources (the host's own
# release entry on Debian, else any URI ending in /debian) and its security counterpart. Returns 1
# when the machine names no Debian archive.
find_mirrors() {
    local codename= entries uri suite
    [[ -r /etc/os-release ]] && codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
    entries=$(apt_sources)
    MIRROR= SECURITY_MIRROR=
    while read -r uri suite; do
        [[ -n $uri ]] || continue
        uri=${uri%/}
        if [[ -z $MIRROR && -n $codename && $suite == "$codename" && $uri == */debian ]]; then MIRROR=$uri; fi
        if [[ -z $SECURITY_MIRROR && ($uri == */debian-security || $suite == *-security) ]]; then
            SECURITY_MIRROR=$uri
        fi
    done <<<"$entries"
    if [[ -z $MIRROR ]]; then
        MIRROR=$(awk '$1 ~ /\/debian\/?$/ { sub(/\/$/, "", $1); print $1; exit }' <<<"$entries")
    fi
    [[ -n $MIRROR ]] || return 1
    if [[ -z $SECURITY_MIRROR ]]; then
        SECURITY_MIRROR=$(sed -E 's#^([a-z+]+://[^/]+).*#\1/debian-security#' <<<"$MIRROR")
    fi
}

# write_private_apt DIR WRITER: an apt configuration under DIR (state, cache, sources and trust
# parts of its own, an empty dpkg status, no recommends) that reads nothing of the system's but
# its network settings; written to DIR/apt.conf, for APT_CONFIG. WRITER names the script in a
# comment. The caller adds its sources under DIR/etc/sources.list.d/ and keys under
# DIR/etc/trusted.gpg.d/.
write_private_apt() {
    local apt=$1 writer=$2
    mkdir -p "$apt"/{state/lists/partial,cache/archives/partial,log,etc/apt.conf.d,etc/sources.list.d,etc/preferences.d,etc/trusted.gpg.d}
    : >"$apt/state/status"
    # apt's sandbox user must be able to write the download dirs.
    if [[ $(id -u) == 0 ]] && id _apt >/dev/null 2>&1; then
        chown -R _apt "$apt/state/lists/partial" "$apt/cache/archives/partial" 2>/dev/null || true
    fi
    {
        echo "// Private apt configuration written by $writer; the system's is not read."
        echo "Dir::Etc::main \"/dev/null\";"
        echo "Dir::Etc::Parts \"$apt/etc/apt.conf.d\";"
        echo "Dir::Etc::SourceList \"/dev/null\";"
        echo "Dir::Etc::SourceParts \"$apt/etc/sources.list.d\";"
        echo "Dir::Etc::Preferences \"/dev/null\";"
        echo "Dir::Etc::PreferencesParts \"$apt/etc/preferences.d\";"
        echo "Dir::Etc::Trusted \"/dev/null\";"
        echo "Dir::Etc::TrustedParts \"$apt/etc/trusted.gpg.d\";"
        echo "Dir::State \"$apt/state\";"
        echo "Dir::State::Lists \"$apt/state/lists\";"
        echo "Dir::State::status \"$apt/state/status\";"
        echo "Dir::State::extended_states \"$apt/state/extended_states\";"
        echo "Dir::Cache \"$apt/cache\";"
        echo "Dir::Cache::Archives \"$apt/cache/archives\";"
        echo "Dir::Log \"$apt/log\";"
        echo "APT::Architecture \"amd64\";"
        echo "APT::Architectures { \"amd64\"; };"
        echo "APT::Install-Recommends \"false\";"
        echo "APT::Install-Suggests \"false\";"
        echo "Acquire::Languages \"none\";"
        # Keep the machine's network settings (proxies, validity checks for snapshot mirrors).
        apt-config dump 2>/dev/null |
            grep -E '^Acquire::((https?|ftp)::Proxy|Check-Valid-Until |Check-Date )' || true
    } >"$apt/apt.conf"
}

# write_debian_sources DIR SUITES...: DIR/etc/sources.list.d/debian.sources naming SUITES (main) on
# $MIRROR and $SUITE-security on $SECURITY_MIRROR, both checked against $KEYRING (see
# find_mirrors and write_private_apt).
write_debian_sources() {
    local apt=$1
    shift
    cat >"$apt/etc/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: $*
Components: main
Signed-By: $KEYRING

Types: deb
URIs: $SECURITY_MIRROR
Suites: $SUITE-security
Components: main
Signed-By: $KEYRING
EOF
}
