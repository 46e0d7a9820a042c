//! What comes in: commands from RabbitMQ, and HTTP probes and scrapes.

pub mod consumer;
pub mod http;
