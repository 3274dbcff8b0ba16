#!/bin/sh
# The image's entrypoint: `relate-smtp ARGS…`, exec'd so that the server keeps this PID.
#
# /opt/relate-smtp/bin/python3-netbind carries the file capability cap_net_bind_service
# (ports 25, 465 and 587 as user app). The kernel refuses to execute such a file when the
# capability is missing from the bounding set (a container started with every capability
# dropped), so there the plain interpreter runs: low ports then need a port map or
# net.ipv4.ip_unprivileged_port_start, high ports work as always.
bounding=$(sed -n 's/^CapBnd:[[:space:]]*//p' /proc/self/status 2>/dev/null)
if [ "$(( (0x${bounding:-0} >> 10) & 1 ))" -eq 1 ]; then
    exec /opt/relate-smtp/bin/python3-netbind -m relate_smtp "$@"
fi
exec /opt/relate-smtp/bin/python3 -m relate_smtp "$@"
