"""The paper's math: the mixture (eq. 4), certified radii (Theorems 1 and 2), sound Lipschitz bounds
and randomized smoothing. Torch only; imports nothing else of the package and does no I/O."""
