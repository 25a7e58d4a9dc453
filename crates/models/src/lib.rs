//! Model definitions (Restormer, D-FINE) written against the engine's Backend.
