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
