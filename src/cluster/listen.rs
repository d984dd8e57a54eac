//! Listening sockets bound by the master and handed to workers.
