"""Building blocks shared by every mixer: input checks, Triton plumbing, varlen bookkeeping,
chunk-local cumulative sums, ahead-of-time compilation for Hopper."""
