"""The config schema: one small dataclass per section (data, model, optim, train, adv, run), composed
by `Config`. The comment after each field is its documentation: `--help` prints it."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from omegaconf import MISSING


class Precision(str, Enum):
    auto = "auto"  # bf16 on GPU; on CPU bf16 where it is native (AMX/AVX512-BF16), else fp32
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


class OptimizerName(str, Enum):
    sgd = "sgd"  # SGD (optim.momentum, optim.nesterov) for every parameter
    muon = "muon"  # Muon for the conv filters (optim.muon_*), SGD for the rest (airbench94_muon): dist_resnet/muon.py


class Schedule(str, Enum):
    onecycle = "onecycle"  # linear warm-up to lr, linear decay to 0
    cosine = "cosine"  # linear warm-up to lr, cosine decay to 0


class Pipeline(str, Enum):
    ffcv = "ffcv"  # FFCV decodes and copies every batch (any data size)
    device = "device"  # the beton is read once into device memory; batches are gathered there


class Crop(str, Enum):
    translate = "translate"  # the stored image, flipped and translated on the device (CIFAR's recipe)
    rrc = "rrc"  # a random-resized crop decoded from the beton at data.res, then flipped (ImageNet's recipe)


class Order(str, Enum):
    random = "random"  # a permutation of every image each epoch (data that the page cache holds)
    quasi_random = "quasi_random"  # pages in random order, images mixed within a window of pages (os_cache=false)


class Normalization(str, Enum):
    auto = "auto"  # imagenet for torchvision's pretrained weights (tv_* models), else dataset
    dataset = "dataset"  # the train split's per-channel mean/std, from the manifest
    imagenet = "imagenet"  # (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225)


class Norm(str, Enum):
    batch = "batch"  # BatchNorm (SyncBatchNorm across ranks with model.sync_bn=true)
    group = "group"  # GroupNorm(8 groups): batch-independent, so DDP equals one big batch exactly


class Pad(str, Enum):
    zeros = "zeros"  # translate pads with 0 after normalisation, i.e. the dataset mean
    reflect = "reflect"  # translate pads with the mirrored border


class TTA(str, Enum):
    none = "none"
    flip = "flip"  # mean logits of the image and its mirror (2 views)
    flip_translate = "flip_translate"  # flip x {none, 1 px up-left, 1 px down-right}, weights 1/2, 1/4, 1/4


class CompileMode(str, Enum):  # torch.compile(mode=...); the names use _ where torch's modes use -
    default = "default"
    reduce_overhead = "reduce-overhead"  # CUDA graphs
    max_autotune = "max-autotune"  # Triton/cuBLAS autotuning + CUDA graphs (long first compile)
    max_autotune_no_cudagraphs = "max-autotune-no-cudagraphs"


class NonFinite(str, Enum):
    stop = "stop"  # end the run (exit code 3), keeping the last good checkpoint
    rollback = "rollback"  # reload the last good checkpoint, halve the LR, go on (at most train.max_rollbacks times)


class Adversarial(str, Enum):
    none = "none"
    fgsm = "fgsm"  # one signed-gradient step (with adv.init=random: FGSM-RS, "Fast is better than free")
    pgd = "pgd"  # adv.steps signed-gradient steps (Madry et al.)


class EvalAttack(str, Enum):
    none = "none"
    pgd = "pgd"  # PGD with adv.eval_steps and adv.eval_restarts at every test evaluation: test/robust_acc


class AdvInit(str, Enum):
    random = "random"  # uniform in the eps-ball
    zero = "zero"


class Monitored(str, Enum):
    val_acc = "val_acc"  # validation accuracy, higher is better
    val_loss = "val_loss"  # validation loss, lower is better


class WandbMode(str, Enum):
    off = "off"
    offline = "offline"  # files in run.dir/wandb, no network; `wandb sync` uploads them later
    online = "online"  # to the W&B server (needs `wandb login`)


class CommHook(str, Enum):
    none = "none"  # DDP's all-reduce of fp32 gradients
    bf16 = "bf16"  # torch's bf16_compress_hook: half the bytes on the wire
    fp16 = "fp16"  # torch's fp16_compress_hook: half the bytes on the wire
    powersgd = "powersgd"  # torch's PowerSGD: low-rank factors with error feedback (its state is checkpointed)


class Device(str, Enum):
    auto = "auto"  # cuda:{LOCAL_RANK} when CUDA is available, else cpu
    cuda = "cuda"
    cpu = "cpu"


@dataclass
class DataConfig:
    dir: str = MISSING  # folder with train.beton, test.beton, manifest.json
    pipeline: Pipeline = Pipeline.ffcv  # ffcv: decode every batch; device: decode once into device memory
    num_workers: int = 8  # FFCV decode threads per rank, at most its share of the node's cores
    batches_ahead: int = 2  # FFCV prefetch depth; must be >= 1
    os_cache: bool = True  # share the beton through the page cache; false: FFCV reads the pages each batch needs
    order: Order = Order.random  # quasi_random: page by page, for data that does not fit in memory (os_cache=false)
    flip: bool = True  # random horizontal flip (train only)
    translate: int = 2  # random translation of up to N pixels of a 32-px image, scaled to the image side (crop=translate)
    translate_pad: Pad = Pad.zeros  # what a translation shifts in: zeros (the mean) or the mirrored border
    flip_alternate: bool = False  # derandomised flip: random in epoch 1, then each image flips every other epoch
    cutout: int = 0  # side of a square (cutout x cutout, clipped at the border) zeroed at a random centre; 0 = off
    mixup_alpha: float = 0.0  # Mixup: lam ~ Beta(alpha, alpha), per batch (timm --mixup; 0.8 is timm's usual); 0 = off
    cutmix_alpha: float = 0.0  # CutMix: a box of 1 - lam of the image from its partner (timm --cutmix; 1.0 usual); 0 = off
    mix_prob: float = 1.0  # the share of steps that mix (with Mixup or CutMix on)
    switch_prob: float = 0.5  # with both on: the share of mixing steps that use CutMix rather than Mixup
    verify: bool = False  # check every beton's sha256 against the manifest before training (sizes: always)
    crop: Crop = Crop.translate  # translate: today's CIFAR augmentation; rrc: random-resized crop while decoding (FFCV)
    rrc_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # rrc: the crop's share of the image's area
    rrc_ratio: list[float] = field(default_factory=lambda: [0.75, 1.333])  # rrc: the crop's aspect ratio (w/h) range
    res: int = 0  # train side in px (crops are resized to res x res); 0 = as stored (needs one stored size)
    res_end: int = 0  # progressive resizing: the train side grows from data.res to this, in steps of 32 px; 0 = off
    res_ramp: list[int] = field(default_factory=lambda: [0, 0])  # progressive resizing: epochs [E0, E1] of the ramp
    test_res: int = 0  # evaluation side: a centre crop resized to test_res x test_res; 0 = as stored
    test_crop_ratio: float = 0.875  # evaluation's centre crop: this share of the shorter side (224/256)
    resize: int = 0  # upsample every batch to resize x resize on the device before the model; 0 = off
    normalize: Normalization = Normalization.auto  # whose mean/std the inputs are normalised with
    fp32_input: bool = False  # normalise in fp32 and feed fp32 batches (fastnet's whitening stem then runs in fp32)
    val_fraction: float = 0.0  # hold out this class-stratified fraction of the train split for validation
    val_seed: int = 0  # which images are held out (fixed across seeds and sweep trials)
    folds: int = 0  # K-fold cross-validation: hold out fold data.fold of a stratified K-fold split (not with val_fraction); 0 = off
    fold: int = 0  # which fold is the validation split: 0..data.folds-1


@dataclass
class ModelConfig:
    name: str = "resnet18"  # see dist_resnet.models.MODELS
    width: int = 64  # base width (resnet9 family: widths w, 2w, 4w, 8w)
    norm: Norm = Norm.batch  # BatchNorm, or GroupNorm (independent of the batch size)
    sync_bn: bool = False  # SyncBatchNorm over all ranks (GPU only; torch has no CPU SyncBatchNorm)
    channels_last: bool = True  # NHWC memory format (faster convolutions on GPU and CPU)
    compile: bool = True  # torch.compile the model (GPU or CPU; on CPU it is often slower and slow to build)
    compile_mode: CompileMode = CompileMode.default  # torch.compile's mode (_ for -)
    pretrained: str = ""  # start from: our .pt checkpoint, a torchvision .pth, a .safetensors, or "torchvision"
    freeze: str = "none"  # none | backbone (a linear probe) | a stage name: it and every stage before it
    residual: bool = False  # fastnet: a residual around each stage's second conv (airbench's stage has none)
    dropout: float = 0.0  # dropout before the classifier, in training only (timm --drop); 0 = off
    drop_path: float = 0.0  # stochastic depth: the last residual block's drop rate, rising linearly from 0 (timm --drop-path)
    blurpool: bool = False  # tv_* models: blur (3x3 binomial) before each strided conv, as FFCV's ResNet-50 recipe
    whiten_bias_epochs: int = 0  # fastnet: train the whitening bias this many epochs, then freeze it; 0 = always


@dataclass
class OptimConfig:
    name: OptimizerName = OptimizerName.sgd  # sgd | muon (Muon for the conv filters, SGD for the rest)
    lr: float = 0.2  # peak learning rate for train.batch_size (with optim.name=muon: of the SGD part)
    momentum: float = 0.9  # SGD momentum
    nesterov: bool = True  # Nesterov momentum (needs momentum > 0)
    weight_decay: float = 5e-4  # never applied to BatchNorm weights or biases
    label_smoothing: float = 0.1  # of the cross-entropy loss, in [0, 1)
    schedule: Schedule = Schedule.onecycle  # per-step LR: linear warm-up, then linear or cosine decay
    warmup_epochs: float = 1.0  # may be fractional
    lr_start: float = 0.0  # warm-up starts from this LR factor: step s < W gets start + (1 - start)(s + 1)/W
    lr_end: float = 0.0  # the decay ends at this factor: the last step gets end + (1 - end)/(T - W)
    norm_bias_lr_scale: float = 1.0  # LR multiplier of normalisation-layer biases (no weight decay on them)
    norm_bias_decay: bool = False  # decay normalisation biases too, as much per step as the weights (wd / scale)
    bias_decay: bool = False  # weight decay on the other biases too (fastnet's whitening bias, as airbench)
    head_lr_scale: float = 1.0  # LR multiplier of the classification head (fine-tuning: often 10)
    layer_decay: float = 1.0  # layer-wise LR decay: stage d of S gets lr x layer_decay^(S - d); 1 = off
    lookahead_every: int = 0  # lookahead: every k steps pull the weights to a slow average (0 = off)
    lookahead_decay: float = 0.95  # per-step decay of the slow average, ramped up as (t / T)^3
    decay_by_lr: bool = False  # weight decay divided by each group's LR multiplier: every group shrinks alike per step
    muon_lr: float = 0.24  # optim.name=muon: the filters' peak LR (the update's scale: it is orthogonalised)
    muon_momentum: float = 0.6  # optim.name=muon: the filters' Nesterov momentum
    muon_ns_steps: int = 3  # optim.name=muon: Newton-Schulz iterations per step (airbench 3, torch 5)


@dataclass
class TrainConfig:
    epochs: int = 20  # fixed for a run: a resume may not change it (the LR schedule spans them)
    max_steps: int = 0  # end after this many optimizer steps, inside the last epoch (airbench: 476 of 10 x 48); 0 = all
    batch_size: int = 512  # GLOBAL batch size, split evenly across ranks
    accum_steps: int = 1  # micro-batches per optimizer step on each rank (all-reduce on the last only)
    seed: int = 0  # >= 0: initial weights, sample order and augmentation all derive from it
    ema: bool = False  # keep an EMA of the weights (and BN buffers), evaluated beside the raw model
    ema_decay: float = 0.999  # per optimizer step
    precision: Precision = Precision.auto  # autocast dtype: auto = bf16 on GPU; CPU: bf16 if native
    device: Device = Device.auto  # auto: cuda:{LOCAL_RANK} when CUDA is available, else cpu
    resume: bool = False  # continue from run.dir's newest checkpoint that loads (config changes are checked)
    keep_last: int = 2  # checkpoints kept (ckpt-<step>.pt); last.pt and best.pt link to the newest and the best
    checkpoint_every: int = 0  # also checkpoint every N optimizer steps inside an epoch (resumable there, bit-exact, as a stop); 0 = at epoch ends only
    timeout_s: float = 600.0  # a collective waits this long for a rank that died or hangs, then the run ends
    comm_hook: CommHook = CommHook.none  # DDP gradient compression: none | bf16 | fp16 | powersgd (torch's comm hooks)
    powersgd_rank: int = 2  # train.comm_hook=powersgd: the rank of the gradient factors
    powersgd_start: int = 1000  # train.comm_hook=powersgd: plain all-reduce for this many steps first (>= 2)
    nonfinite: NonFinite = NonFinite.stop  # what a NaN/inf loss does (checked at log_every and epoch end)
    max_rollbacks: int = 3  # train.nonfinite=rollback: how many times before giving up
    eval_every: int = 1  # epochs between evaluations (the last epoch always evaluates)
    eval_test_every: int = 0  # with a validation split: epochs between test evaluations (0 = at the end only)
    tta: TTA = TTA.none  # test-time augmentation of every evaluation
    log_every: int = 50  # steps between host syncs for logging
    stop_check_every: int = 10  # steps between checks for a stop request (SIGUSR1/SIGTERM or run.dir/STOP)
    deterministic: bool = False  # deterministic kernels where torch has them (slower); sets CUBLAS_WORKSPACE_CONFIG
    loss_scale: float = 0.0  # fp16: 0 = dynamic (GradScaler, one host sync per step); > 0 = this fixed scale, no sync
    warmup_steps: int = 0  # untimed steps on throw-away data first (compile, autotune); the state is restored exactly
    early_stop_patience: int = 0  # stop after this many evaluations without improvement (needs a validation split: data.val_fraction or data.folds); 0 = off
    early_stop_min_delta: float = 0.0  # an improvement smaller than this counts as none
    early_stop_monitor: Monitored = Monitored.val_acc  # what early stopping and best.pt watch: val_acc | val_loss
    adversarial: Adversarial = Adversarial.none  # train on adversarial examples (adv.*): none | fgsm | pgd
    eval_attack: EvalAttack = EvalAttack.none  # also report accuracy under PGD (adv.eval_*) at each test evaluation


@dataclass
class AdvConfig:
    eps: float = 8.0  # L-inf radius in pixel levels (0-255) of the [0, 1] image, for training and evaluation
    alpha: float = 0.0  # step size in pixel levels; 0 = 1.25 eps for fgsm, 2.5 eps / steps for pgd
    steps: int = 7  # train.adversarial=pgd: attack steps per training step (fgsm: 1)
    init: AdvInit = AdvInit.random  # the attack's start: random in the ball (FGSM-RS) or the image itself
    eval_alpha: float = 2.0  # step size of the evaluation PGD, in pixel levels
    eval_steps: int = 20  # steps of the evaluation PGD (train.eval_attack=pgd)
    eval_restarts: int = 1  # random restarts of the evaluation PGD; an image counts if it withstands all
    eval_every: int = 1  # epochs between the test set's attacks (at its evaluations); 0 = at the end only
    check_images: int = 512  # adversarial training: train images PGD-attacked every epoch to catch a collapse
    check_steps: int = 10  # steps of that check's PGD (alpha = adv.eval_alpha)


@dataclass
class RunConfig:
    dir: str = MISSING  # output folder: config.yaml, metrics.json, checkpoints, TensorBoard
    progress: bool = True  # tqdm bar on rank 0
    pictures: bool = True  # confusion.png and curves.png at the end (matplotlib: ~0.5 s of CPU); per_class.json either way
    csv: bool = False  # also log the scalars to run.dir/scalars.csv
    mlflow: str = ""  # MLflow tracking URI (http://host:5000, sqlite:///x.db, ...; local = an SQLite store in run.dir, or the sweep folder); empty = off
    mlflow_experiment: str = "dist_resnet"  # the MLflow experiment runs are logged to
    mlflow_parent: str = ""  # the MLflow run this run is a child of (a sweep sets it for its trials)
    wandb: WandbMode = WandbMode.off  # Weights & Biases: off | offline | online
    wandb_project: str = "dist_resnet"  # the W&B project
    wandb_group: str = ""  # the W&B group (a sweep sets it to its study)


@dataclass
class DistillConfig:
    teacher: str = ""  # knowledge distillation from this trained model (our checkpoint or .safetensors); empty = off
    alpha: float = 0.5  # the soft loss's weight: alpha x T^2 x KL(teacher || student, softened by T) + (1 - alpha) x the usual loss
    temperature: float = 4.0  # T: both outputs softened as softmax(logits / T)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    adv: AdvConfig = field(default_factory=AdvConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    run: RunConfig = field(default_factory=RunConfig)


class ConfigError(ValueError):
    """A config that cannot run; the message says which key and what is valid."""


SECTIONS = {"data": DataConfig, "model": ModelConfig, "optim": OptimConfig, "train": TrainConfig, "adv": AdvConfig,
            "distill": DistillConfig, "run": RunConfig}
