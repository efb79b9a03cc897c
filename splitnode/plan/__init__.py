"""`splitnode plan`: profile this box's devices with the real engine, simulate splitnode's own
scheduling policies on a workload, and rank the role layouts of the devices by predicted goodput
(the same SLO and goodput code as `splitnode bench serve` judges the simulated runs)."""
