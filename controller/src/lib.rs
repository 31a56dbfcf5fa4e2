//! `sidemesh-controller`: the Kubernetes side of sidemesh.
//!
//! It will watch Services, EndpointSlices, Pods and sidemesh's CRDs, feed the discover API
//! in-process, and inject the sidecar and plugin containers through a mutating admission
//! webhook. Not built yet: see the controller issue.
