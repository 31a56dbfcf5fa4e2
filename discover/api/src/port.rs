//! Port newtypes. The app's own port, the remapped port its sidecar listens on, and a
//! dependency's service port are different things; mixing them up is a compile error.

use std::fmt;

use serde::{Deserialize, Serialize};

macro_rules! port_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub u16);

        impl $name {
            /// The port number.
            pub fn get(self) -> u16 {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

port_type!(
    /// A port the application itself listens on (inside the pod, on 127.0.0.1).
    AppPort
);
port_type!(
    /// The remapped inbound port a sidecar listens on for an [`AppPort`].
    OuterPort
);
port_type!(
    /// A dependency service's port, as the app dials it on the service's loopback address.
    ServicePort
);
