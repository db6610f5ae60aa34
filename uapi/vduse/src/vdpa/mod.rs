//! vdpa
