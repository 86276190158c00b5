"""The paper's mathematics, in torch and numpy only (no params, paths, files or DVC); each
concept in the file named after it:

  karras.py     the Karras sigma grid, Euler and Heun steps, the teacher's samplers (EDM Alg. 1)
  precond.py    c_in, c_noise, c_skip, c_out: the EDM denoiser, the consistency function (and ECT's),
                the epsilon-prediction teacher (Karras et al. 2022, Table 1; Song et al. 2023, App. C)
  losses.py     the EDM loss, the distances d, the consistency loss of CD and CT (eq. 7, Alg. 2, 3),
                the loss of Easy Consistency Tuning (Geng et al. 2025)
  schedules.py  N(k), mu(k), the iCT curriculum, index distribution and weighting; ECT's t and r(t)
  sampling.py   multistep consistency sampling (Algorithm 1), shared by editing
  editing.py    zero-shot editing constraints (Algorithm 4)

The formulas: docs/design.md §3.
"""
