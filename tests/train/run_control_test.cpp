// Stop signals: the first SIGTERM or SIGINT only asks for a stop; the second ends the process.
#include <gtest/gtest.h>

#include <csignal>

#include "train/run_control.h"

namespace gbmoe {
namespace {

TEST(StopSignals, TheFirstSignalAsksToStop) {
  for (int sig : {SIGTERM, SIGINT}) {
    StopSignals signals;
    EXPECT_FALSE(stop_requested());
    std::raise(sig);
    EXPECT_TRUE(stop_requested()) << sig;
  }
  StopSignals again;
  EXPECT_FALSE(stop_requested());  // a new run starts without the old request
}

TEST(StopSignalsDeathTest, TheSecondSignalStopsAtOnce) {
  EXPECT_EXIT(
      {
        StopSignals signals;
        std::raise(SIGTERM);
        std::raise(SIGTERM);
        std::exit(0);
      },
      ::testing::KilledBySignal(SIGTERM), "a second signal stops at once");
}

}  // namespace
}  // namespace gbmoe
