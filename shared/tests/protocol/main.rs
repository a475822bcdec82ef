//! razar-shared protocol tests: codec properties and agent–collector sessions on a
//! simulated clock. One test binary; helpers in `support/`.

mod codec;
mod session;
mod support;
