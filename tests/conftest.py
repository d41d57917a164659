
def pytest_configure(config):
    # torchvision 0.29 deprecates its image codecs in favour of TorchCodec on every decode/encode; data.py keeps
    # torchvision.io (a dependency we have), so the warning is noise in the test output
    config.addinivalue_line("filterwarnings", "ignore:The image decoding and encoding:DeprecationWarning")
