"""torchvision ResNets as feature extractors: `resnet(arch, cifar_stem, zero_init_residual)`."""
import torch.nn as nn
import torchvision

DIMS = {"resnet18": 512, "resnet50": 2048}


def resnet(arch="resnet18", cifar_stem=False, zero_init_residual=False, norm_layer=None):
    """A torchvision ResNet without its classifier: (N, 3, H, W) -> (N, dim), `dim` as an attribute.

    The CIFAR stem is the variant every CIFAR result uses: a 3x3 stride-1 first convolution and no
    max-pool, so that a 32-px image is not shrunk to 8 px before the first residual stage."""
    if arch not in DIMS:
        raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(DIMS)}")
    net = getattr(torchvision.models, arch)(weights=None, zero_init_residual=zero_init_residual, norm_layer=norm_layer)
    if cifar_stem:
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    net.dim = DIMS[arch]
    return net


def uses_cifar_stem(image_size):
    return image_size <= 64


def from_state_dict(state_dict):
    """Rebuild the backbone a plain `backbone.pt` state_dict came from (arch and stem read off it)."""
    arch = "resnet50" if "layer1.0.conv3.weight" in state_dict else "resnet18"
    cifar_stem = state_dict["conv1.weight"].shape[-1] == 3
    net = resnet(arch, cifar_stem)
    net.load_state_dict(state_dict)
    return net
