//! F2: socket-level load balancing for the node's own processes
//! (cgroup/connect4, sendmsg4, recvmsg4, getpeername4).
