"""Shared test support (no tests here): launchers for subprocess and torchrun runs and the shared one-process
references (`launch`), readers of a run's records (`runs`), numeric asserts (`numerics`), tiny configs and text
(`configs`), the training entry that fails a run which gathers the whole model (`guarded_train`), the one that forces
the loss into chunks (`chunked_train`), the probe of the files a rank reads while it saves or resumes (`read_probe`),
synthetic corpora for the data tests (`corpora`), the test environment (`environment`) and the golden per-step loss
file of the demo model (`golden`). Test modules import from here, never from each other or from conftest (which
holds fixtures and hooks only)."""
