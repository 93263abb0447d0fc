"""`python -m lmservice.kernels [DIR]`: build the native CPU kernels, every variant for this machine, into DIR
(by default the package's own _native/ folder, where they are loaded from). See native_build.py."""

from lmservice.kernels.native_build import main

main()
