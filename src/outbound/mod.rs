//! Adapters behind the ports: PostgreSQL, Redis, Docker.

pub mod docker;
pub mod postgres;
pub mod redis_lease;
pub mod relay;
