//! Route tables: matching a request to a virtual host and route, and what the route does.

pub mod entry;
pub mod hash;
pub mod headers;
pub mod index;
pub mod matcher;
pub mod request;
pub mod table;

pub use entry::{Action, ClusterChoice, Route};
pub use request::RequestView;
pub use table::{Matched, RouteTable};
