#!/bin/bash
# Captures Chromium's QUIC Initials to a UDP/443 server that reads and never
# answers (no ICMP either, so Chromium sends its whole first flight and its
# retransmissions): chromium-quic.pcap, for `blokir replay` and the host
# model's QUIC tests. Run as root; needs chromium and tcpdump.
set -u
OUT=${1:-chromium-quic.pcap}
TMP=$(mktemp -d)
C=bqcap-c; S=bqcap-s
ip netns del $C 2>/dev/null; ip netns del $S 2>/dev/null
ip netns add $C; ip netns add $S
ip link add qc0 netns $C type veth peer name qs0 netns $S
ip -n $C link set lo up; ip -n $S link set lo up
ip -n $C link set qc0 up; ip -n $S link set qs0 up
ip -n $C addr add 198.18.0.1/24 dev qc0; ip -n $S addr add 198.18.0.2/24 dev qs0
ip -n $C addr add 2001:db8::1/64 dev qc0 nodad; ip -n $S addr add 2001:db8::2/64 dev qs0 nodad
# Wire-sized datagrams.
ip netns exec $C ethtool -K qc0 tso off gso off gro off >/dev/null 2>&1
ip netns exec $S ethtool -K qs0 tso off gso off gro off >/dev/null 2>&1
ip netns exec $S python3 -c "
import socket,threading
def sink(fam,addr):
    s=socket.socket(fam,socket.SOCK_DGRAM); s.bind(addr)
    while True: s.recvfrom(4096)
threading.Thread(target=sink,args=(socket.AF_INET,('198.18.0.2',443)),daemon=True).start()
sink(socket.AF_INET6,('2001:db8::2',443))
" &
SINK=$!
sleep 1
ip netns exec $S tcpdump -i qs0 -U -s 0 -w "$OUT" 'udp dst port 443' >/dev/null 2>&1 &
TD=$!
sleep 1
quic() { # NAME ADDRESS
  ip netns exec $C timeout 6 chromium --headless --no-sandbox --disable-gpu --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --user-data-dir="$TMP/chrome-$1" --ignore-certificate-errors \
    --host-resolver-rules="MAP * $2" --origin-to-force-quic-on="$1:443" \
    --dump-dom "https://$1/" >/dev/null 2>&1
}
quic quic.portal.blocked.example 198.18.0.2
quic x.test '[2001:db8::2]'
sleep 1
kill $TD $SINK 2>/dev/null; wait $TD 2>/dev/null
ip netns del $C; ip netns del $S
rm -rf "$TMP"
echo "captured: $OUT"
