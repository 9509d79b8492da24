"""The SyncDiffusion paper's evaluation code, restated literally: what evaluate.py must match.

Restated from `eval_code/` (crop_panorama.py, eval_intra_lpips.py, eval_style_loss.py,
eval_clip_score.py) of https://github.com/KAIST-Visual-AI-Group/SyncDiffusion,
Copyright (c) 2023 Yuseung Lee, MIT License. It is kept as close to the original as the
differences below allow, slow and obvious, like the sampler's oracle:

- each script's `main` is a function returning {file name: figure} instead of appending
  rounded text to a file, and walks the folder in name order (the scripts use os.listdir);
- the crop side, 512 there, is the module constant WINDOW, so tests can run on small crops;
- images are read with Pillow: for 8-bit RGB PNGs, the array that OpenCV's imread and
  cvtColor(BGR2RGB) give; crop_panorama writes its crops with Pillow too (lossless PNG);
- the CLIP model is a parameter (the scripts name openai/clip-vit-base-patch16);
- `intra_style_loss(..., resize=False)` skips the style script's resize, which the report
  does for panoramas taller than 512 both ways.
"""

from __future__ import annotations

import itertools
import os
from os.path import join

import lpips
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim
import torchvision.models as models
import torchvision.transforms as T
from PIL import Image

WINDOW = 512
device = "cpu"


def seed_everything(seed):
    torch.manual_seed(seed)
    np.random.seed(seed)


def get_views_crop(panorama_height, panorama_width, window_size=512, stride=512):
    num_blocks_height = (panorama_height - window_size) // stride + 1
    num_blocks_width = (panorama_width - window_size) // stride + 1
    total_num_blocks = int(num_blocks_height * num_blocks_width)
    views = []
    for i in range(total_num_blocks):
        h_start = int((i // num_blocks_width) * stride)
        h_end = h_start + window_size
        w_start = int((i % num_blocks_width) * stride)
        w_end = w_start + window_size
        views.append((h_start, h_end, w_start, w_end))
    return views


# --- eval_intra_lpips.py -----------------------------------------------------------------


def intra_lpips(data_dir, stride=None):
    stride = WINDOW if stride is None else stride
    seed_everything(2023)
    image_paths = sorted(os.listdir(data_dir))

    # Load LPIPS
    loss_fn_vgg = lpips.LPIPS(net="vgg", verbose=False)
    loss_fn_vgg.to(device)

    results = {}
    for image_path in image_paths:
        # Load panorama image
        panorama = np.asarray(Image.open(os.path.join(data_dir, image_path)).convert("RGB"))
        panorama = panorama.astype(np.float32) / 255.0
        panorama = panorama * 2.0 - 1.0  # normalize to [-1, 1]
        H, W, _ = panorama.shape

        # Obtain crop positions
        crop_pos_list = get_views_crop(H, W, window_size=WINDOW, stride=stride)
        crops_torch = torch.zeros((len(crop_pos_list), 3, WINDOW, WINDOW))

        # Obtain crops in torch
        for view_idx, (h_start, h_end, w_start, w_end) in enumerate(crop_pos_list):
            crop = panorama[h_start:h_end, w_start:w_end]
            crops_torch[view_idx] = torch.from_numpy(crop.transpose(2, 0, 1))
        crops_torch = crops_torch.to(device)

        idx_list = range(len(crop_pos_list))
        combs = list(itertools.combinations(idx_list, 2))

        # compute LPIPS
        intra_lpips = 0.0
        for comb in combs:
            crop1 = crops_torch[comb[0]]  # 3 x 512 x 512
            crop2 = crops_torch[comb[1]]  # 3 x 512 x 512
            intra_lpips += loss_fn_vgg(crop1, crop2).item()

        # Compute average
        intra_lpips /= len(combs)
        results[image_path] = intra_lpips
    return results


# --- eval_style_loss.py ------------------------------------------------------------------


def gram_matrix(input):
    a, b, c, d = input.size()
    features = input.view(a * b, c * d)
    G = torch.mm(features, features.t())
    return G.div(a * b * c * d)


class StyleLoss(nn.Module):
    def __init__(self, target_feature):
        super().__init__()
        self.target = gram_matrix(target_feature).detach()

    def forward(self, input):
        G = gram_matrix(input)
        self.loss = F.mse_loss(G, self.target)
        return input


class Normalization(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def forward(self, img):
        return (img - self.mean) / self.std


def get_input_optimizer(input_img):
    optimizer = optim.LBFGS([input_img])
    return optimizer


def get_style_model(cnn, normalization_mean, normalization_std, style_img, style_layers):
    normalization = Normalization(normalization_mean, normalization_std).to(device)
    style_loss_list = []
    model = nn.Sequential(normalization)

    i = 0  # increment every time we see a conv
    for layer in cnn.children():
        if isinstance(layer, nn.Conv2d):
            i += 1
            name = f"conv_{i}"
        elif isinstance(layer, nn.ReLU):
            name = f"relu_{i}"
            layer = nn.ReLU(inplace=False)
        elif isinstance(layer, nn.MaxPool2d):
            name = f"pool_{i}"
        elif isinstance(layer, nn.BatchNorm2d):
            name = f"bn_{i}"
        else:
            raise RuntimeError(f"Unrecognized layer: {layer.__class__.__name__}")

        model.add_module(name, layer)

        if name in style_layers:
            target_feature = model(style_img).detach()
            style_loss = StyleLoss(target_feature)
            model.add_module(f"style_loss_{i}", style_loss)
            style_loss_list.append(style_loss)

    # Now we trim off the layers after the last content and style losses
    for i in range(len(model) - 1, -1, -1):
        if isinstance(model[i], StyleLoss):
            break
    model = model[: (i + 1)]
    return model, style_loss_list


def image_loader(image_name, resize=True):
    loader = T.Compose([T.Resize(WINDOW), T.ToTensor()]) if resize else T.ToTensor()
    image = Image.open(image_name)
    image = loader(image).unsqueeze(0)
    return image.to(device, torch.float)


def intra_style_loss(data_dir, stride=None, resize=True):
    stride = WINDOW if stride is None else stride
    seed_everything(2023)
    image_paths = sorted(os.listdir(data_dir))

    cnn = models.vgg19(pretrained=True).features.to(device).eval()
    cnn_normalization_mean = torch.tensor([0.485, 0.456, 0.406]).to(device)
    cnn_normalization_std = torch.tensor([0.229, 0.224, 0.225]).to(device)
    style_layers_default = ["conv_1", "conv_2", "conv_3", "conv_4", "conv_5"]

    results = {}
    for image_path in image_paths:
        pano_image = image_loader(join(data_dir, image_path), resize=resize)
        H, W = pano_image.shape[2], pano_image.shape[3]

        crop_pos_list = get_views_crop(H, W, window_size=WINDOW, stride=stride)
        crops_torch = torch.zeros((len(crop_pos_list), 1, 3, WINDOW, WINDOW))
        for view_idx, (h_start, h_end, w_start, w_end) in enumerate(crop_pos_list):
            crops_torch[view_idx] = pano_image[:, :, h_start:h_end, w_start:w_end]
        crops_torch = crops_torch.to(device)

        idx_list = range(len(crop_pos_list))
        combs = list(itertools.combinations(idx_list, 2))

        style_loss = 0.0
        for comb in combs:
            crop1 = crops_torch[comb[0]]
            crop2 = crops_torch[comb[1]]
            style_model, style_losses = get_style_model(
                cnn,
                cnn_normalization_mean,
                cnn_normalization_std,
                crop1,
                style_layers=style_layers_default,
            )
            crop2.requires_grad_(True)
            style_model.requires_grad_(False)
            optimizer = get_input_optimizer(crop2)
            with torch.no_grad():
                crop2.clamp_(0, 1)
            optimizer.zero_grad()
            style_model(crop2)

            style_score = 0
            for sl in style_losses:
                style_score += sl.loss
            style_loss += style_score.item()
        results[image_path] = style_loss
    return results


# --- crop_panorama.py and eval_clip_score.py ---------------------------------------------


def crop_panorama(data_dir, save_dir, num_crops=1):
    seed_everything(2023)
    os.makedirs(save_dir, exist_ok=True)
    images = [f for f in sorted(os.listdir(data_dir)) if (".png" in f or ".jpg" in f)]
    for image_name in images:
        image = np.asarray(Image.open(join(data_dir, image_name)).convert("RGB"))
        H, W, _ = image.shape
        assert H == WINDOW, f"Panorama height is not {WINDOW}: {H}"
        for _ in range(num_crops):
            rand_int = np.random.randint(0, W - WINDOW)
            image_cropped = image[:, rand_int : rand_int + WINDOW, :]  # Random crop
            Image.fromarray(image_cropped).save(join(save_dir, image_name))


def clip_scores(data_dir, prompt, model_name_or_path):
    from torchmetrics.multimodal import CLIPScore

    seed_everything(2023)
    metric = CLIPScore(model_name_or_path=model_name_or_path)
    metric = metric.to(device)

    results = {}
    for image_path in sorted(os.listdir(data_dir)):
        image = Image.open(join(data_dir, image_path))
        image = T.ToTensor()(image)
        image = image.to(device)
        image = image * 255.0
        image = image.type(torch.int64)
        score = metric(image, prompt)
        results[image_path] = score.item()
    return results
