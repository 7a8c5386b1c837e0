// odconv-deploy's ExecuTorch runner for a device: loads one .pte and serves the device
// protocol (odconv_deploy/devices/protocol.py) on stdin/stdout, so the program is loaded
// once and latency is timed here, on the device, not across the transport.
//
// Built by odconv_deploy/devices/build.py against the libraries and headers of an
// executorch wheel for the device's architecture (no torch needed).
//
//   pte_runner MODEL.pte THREADS
#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#ifndef ODCONV_ET_VERSION
#define ODCONV_ET_VERSION "unknown"
#endif

// libexecutorch_threadpool.so exports this; the wheel ships no header for it.
namespace executorch::extension::threadpool {
class ThreadPool {
 public:
  bool _unsafe_reset_threadpool(uint32_t num_threads);
};
ThreadPool* get_threadpool();
}  // namespace executorch::extension::threadpool

using executorch::aten::ScalarType;
using executorch::extension::Module;
using executorch::extension::TensorPtr;
using executorch::runtime::EValue;

namespace {

struct Tensor {
  std::vector<int32_t> shape;
  std::vector<float> data;
};

std::string escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    if (c == '\n') { out += "\\n"; continue; }
    if (static_cast<unsigned char>(c) < 0x20) continue;
    out += c;
  }
  return out;
}

void reply_error(const std::string& message) {
  std::cout << "error " << escape(message) << "\n" << std::flush;
}

// The first processor's lines of /proc/cpuinfo as the runtime's process sees them.
std::string cpuinfo_json() {
  std::ifstream in("/proc/cpuinfo");
  std::string line, out;
  while (std::getline(in, line)) {
    if (line.empty() && !out.empty()) break;
    auto colon = line.find(':');
    if (colon == std::string::npos) continue;
    std::string key = line.substr(0, colon), value = line.substr(colon + 1);
    key.erase(key.find_last_not_of(" \t") + 1);
    value.erase(0, value.find_first_not_of(" \t"));
    if (!out.empty()) out += ",";
    out += "\"" + escape(key) + "\":\"" + escape(value) + "\"";
  }
  return "{" + out + "}";
}

bool read_tensors(size_t count, std::vector<Tensor>& tensors, std::string& why) {
  tensors.assign(count, Tensor{});
  for (auto& t : tensors) {
    std::string header;
    if (!std::getline(std::cin, header)) { why = "input ended in a tensor header"; return false; }
    std::istringstream fields(header);
    std::string dtype;
    size_t ndim = 0;
    fields >> dtype >> ndim;
    if (dtype != "f4") { why = "only float32 (f4) inputs are supported, got " + dtype; return false; }
    size_t numel = 1;
    for (size_t d = 0; d < ndim; ++d) {
      int64_t dim = 0;
      fields >> dim;
      t.shape.push_back(static_cast<int32_t>(dim));
      numel *= static_cast<size_t>(dim);
    }
    t.data.resize(numel);
    std::cin.read(reinterpret_cast<char*>(t.data.data()), numel * sizeof(float));
    if (static_cast<size_t>(std::cin.gcount()) != numel * sizeof(float)) {
      why = "input ended inside tensor data";
      return false;
    }
  }
  return true;
}

bool execute(Module& module, std::vector<Tensor>& inputs, std::vector<EValue>& outputs,
             std::string& why) {
  std::vector<TensorPtr> owners;
  std::vector<EValue> args;
  for (auto& t : inputs) {
    owners.push_back(executorch::extension::make_tensor_ptr(t.shape, t.data.data()));
    args.emplace_back(*owners.back());
  }
  auto result = module.forward(args);
  if (!result.ok()) {
    why = "forward failed with ExecuTorch error " +
          std::to_string(static_cast<int>(result.error())) + " for inputs of shape";
    for (auto& t : inputs) {
      why += " (";
      for (size_t d = 0; d < t.shape.size(); ++d) why += (d ? "," : "") + std::to_string(t.shape[d]);
      why += ")";
    }
    return false;
  }
  outputs = std::move(result.get());
  return true;
}

void write_outputs(const std::vector<EValue>& outputs) {
  std::cout << "ok " << outputs.size() << "\n";
  for (const auto& value : outputs) {
    const auto& t = value.toTensor();
    std::cout << "f4 " << t.dim();
    for (int d = 0; d < t.dim(); ++d) std::cout << " " << t.size(d);
    std::cout << "\n";
    std::cout.write(reinterpret_cast<const char*>(t.const_data_ptr<float>()),
                    t.numel() * sizeof(float));
  }
  std::cout << std::flush;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::cerr << "usage: pte_runner MODEL.pte THREADS\n";
    return 2;
  }
  std::ios::sync_with_stdio(false);
  int threads = std::max(1, std::atoi(argv[2]));
  executorch::extension::threadpool::get_threadpool()->_unsafe_reset_threadpool(threads);
  Module module(argv[1], Module::LoadMode::File);
  auto loaded = module.load_forward();
  if (loaded != executorch::runtime::Error::Ok) {
    reply_error(std::string("ExecuTorch cannot load ") + argv[1] + " (error " +
                std::to_string(static_cast<int>(loaded)) + ")");
    return 3;
  }
  std::cout << "ready {\"runtime\":\"executorch\",\"version\":\"" ODCONV_ET_VERSION
            << "\",\"threads\":" << threads << ",\"cpuinfo\":" << cpuinfo_json() << "}\n"
            << std::flush;

  std::string line;
  while (std::getline(std::cin, line)) {
    std::istringstream request(line);
    std::string op;
    request >> op;
    if (op == "quit") return 0;
    size_t warmup = 0, runs = 1, count = 0;
    if (op == "infer") {
      request >> count;
    } else if (op == "bench") {
      request >> warmup >> runs >> count;
    } else {
      reply_error("unknown request: " + line);
      continue;
    }
    std::vector<Tensor> inputs;
    std::string why;
    if (!read_tensors(count, inputs, why)) { reply_error(why); return 4; }
    std::vector<EValue> outputs;
    if (op == "infer") {
      if (execute(module, inputs, outputs, why)) write_outputs(outputs); else reply_error(why);
      continue;
    }
    std::vector<double> times_ms;
    bool ok = true;
    for (size_t i = 0; ok && i < warmup + runs; ++i) {
      auto start = std::chrono::steady_clock::now();
      ok = execute(module, inputs, outputs, why);
      std::chrono::duration<double, std::milli> took = std::chrono::steady_clock::now() - start;
      if (i >= warmup) times_ms.push_back(took.count());
    }
    if (!ok) { reply_error(why); continue; }
    std::cout << "ok {\"times_ms\":[";
    for (size_t i = 0; i < times_ms.size(); ++i) std::cout << (i ? "," : "") << times_ms[i];
    std::cout << "]}\n" << std::flush;
  }
  return 0;
}
