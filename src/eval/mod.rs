//! Hallucination evaluation: POPE and CHAIR / Object HalBench, computed exactly as the official scripts.
