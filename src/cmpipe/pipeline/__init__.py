"""The only code besides stages/ that knows params.yaml, the artifact paths and DVC: the params
schema, the layout of data/ and reports/, the stage runner and launcher, the training-stage skeleton and each training stage's setup."""
