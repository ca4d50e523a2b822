//! Choosing a certificate per client by SNI (being written).
