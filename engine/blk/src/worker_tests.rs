//! Good requests through a real worker, notification suppression, and broken rings.
