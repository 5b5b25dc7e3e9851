//! Network-namespace topology of DESIGN.md (owned by the e2e work).
