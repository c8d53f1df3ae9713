"""tests/npu mirror afd/npu: the fake NPU is installed in this process (as `--afd-npu` would) for every test here."""
import afd.npu

afd.npu.install()
