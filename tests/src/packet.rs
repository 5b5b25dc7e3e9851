//! Packet builders and checksum verification for BPF_PROG_TEST_RUN tests (owned by the datapath work).
