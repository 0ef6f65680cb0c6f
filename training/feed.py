"""From a loaded uint8 batch to the network's input on the towers' devices, without waiting for them.

On GPUs, per step: the uint8 batch (25 MB at 128 images; a float32 batch would be 77 MB) and one packed
tensor of augmentation parameters cross to each tower's device on a side stream, so the copy overlaps
the previous step's compute; each device then crops, flips, subtracts the mean and adds the lighting on
its own copy with the same parameters. So no float32 batch crosses from GPU 0 to GPU 1, and nothing
here makes the host wait for a GPU. The loader's buffer slot is handed back once its copy is done.

On the CPU the batch is augmented in place of the copy, into one reused float32 buffer (a fresh 77 MB
allocation per step costs tens of thousands of page faults there).
"""

from __future__ import annotations

import torch

from .augment import AugmentParams, TrainAugmentation


class DeviceFeed:
    def __init__(self, stats, crop: int, alpha_std: float, devices, channels_last: bool = False):
        self.devices = list(dict.fromkeys(devices))  # distinct, tower 0's first
        self.tower_devices = tuple(devices)
        self.augment = {d: TrainAugmentation(stats, crop=crop, alpha_std=alpha_std, device=d) for d in self.devices}
        self.crop, self.channels_last = crop, channels_last
        self.cuda = self.devices[0].type == "cuda"
        self.streams = {d: torch.cuda.Stream(d) for d in self.devices} if self.cuda else {}
        self._in_flight = None  # (events, batch) of the last copy, released at the next step
        self._cpu_buffer = torch.empty(0)

    def __call__(self, batch, params: AugmentParams):
        """(inputs for the net — one tensor, or one per tower device —, labels on tower 0's device)."""
        if not self.cuda:
            x = self._augment_on_cpu(batch.images, params)
            labels = batch.labels.clone()
            batch.release()
            return x, labels
        return self._augment_on_gpus(batch, params)

    def _augment_on_cpu(self, images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        shape = (len(images), 3, self.crop, self.crop)
        if self._cpu_buffer.shape != shape:
            self._cpu_buffer = torch.empty(shape)
        x = self.augment[self.devices[0]](images, params, out=self._cpu_buffer)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _augment_on_gpus(self, batch, params: AugmentParams):
        self._release_previous()
        packed = params.packed(pin_memory=True)
        placed, events = {}, []
        for device in self.devices:
            stream = self.streams[device]
            with torch.cuda.stream(stream):
                placed[device] = (
                    batch.images.to(device, non_blocking=True),
                    packed.to(device, non_blocking=True),
                    batch.labels.to(device, non_blocking=True) if device == self.devices[0] else None,
                )
            events.append(stream.record_event())
            compute = torch.cuda.current_stream(device)
            compute.wait_stream(stream)
            for tensor in placed[device]:
                if tensor is not None:
                    tensor.record_stream(compute)  # allocated on the side stream, used on the compute stream
        self._in_flight = (events, batch)
        inputs = {}
        for device, (images, device_params, _) in placed.items():
            x = self.augment[device](images, AugmentParams.unpacked(device_params))
            inputs[device] = x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
        labels = placed[self.devices[0]][2]
        if len(self.devices) == 1:
            return inputs[self.devices[0]], labels
        return [inputs[d] for d in self.tower_devices], labels

    def _release_previous(self) -> None:
        """Hand the previous step's slot back once its copies are done (they were queued a step ago, on
        streams of their own: this wait is short or nothing)."""
        if self._in_flight is not None:
            events, batch = self._in_flight
            for event in events:
                event.synchronize()
            batch.release()
            self._in_flight = None

    def close(self) -> None:
        self._release_previous()
