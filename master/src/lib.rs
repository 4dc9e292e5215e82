//! Kiln's build master: it keeps the queue, turns changes into build requests, hands builds to
//! workers and runs their steps, and serves Buildbot's REST data API.

pub mod changes;
pub mod clock;
pub mod collapse;
pub mod config;
pub mod domain;
pub mod engine;
pub mod events;
pub mod force;
pub mod fuzz;
pub mod grpc;
pub mod http;
pub mod master;
pub mod msgpack;
pub mod plan;
pub mod poller;
pub mod pool;
pub mod properties;
pub mod remote;
pub mod results;
pub mod scaling;
pub mod schedulers;
pub mod secrets;
pub mod server;
pub mod signals;
pub mod store;
pub mod telemetry;
pub mod timed;
pub mod tls;
pub mod worker_port;
pub mod workers;
