//! Sockets: listeners (TCP with `SO_REUSEPORT`, unix), socket pairs and
//! descriptor passing (`SCM_RIGHTS`), and `LISTEN_FDS` fd placement.
