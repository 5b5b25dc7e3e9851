//! E1: a frontend with no usable endpoint at all answers like kube-proxy's
//! REJECT: a TCP reset for TCP, an ICMP port unreachable for UDP, built from
//! the offending packet and sent back out of the interface it came in on.
