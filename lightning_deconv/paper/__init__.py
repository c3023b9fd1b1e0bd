"""The paper's experiment, built on the library: ZFNet, its training module, filter RMS clipping, data,
figures rebuilt from a run, and the ``lightning-deconv`` command line (Zeiler & Fergus, ECCV 2014)."""
